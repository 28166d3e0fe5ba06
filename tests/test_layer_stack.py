"""The layer stack (scanned or unrolled blocks, rematerialisation) and the attention implementations
(sentcomp.models.layers.self_attention) of GPT-2 and the shared decoder: the same numbers every way, against a
float64 numpy attention, one checkpoint for all, and chunked attention's memory growing as T, not T²."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sentcomp.errors import SentcompError
from sentcomp.models import decoder, gpt2, layers, llama
from sentcomp.models.decoder import DecoderConfig

# compared with the default (scanned, no remat, XLA attention); several changes per compile to keep tests fast
EXECUTIONS = {"gpt2": dict(scan_layers=False, remat="dots", attention="chunked", attention_chunk=3),
              "decoder": dict(remat="full", attention="chunked", attention_chunk=4)}


def tiny_gpt2(**fields) -> gpt2.GPT2Config:
    # scale_attn_by_inverse_layer_idx: each block must see its own (scanned) index
    return gpt2.gpt2_config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
                            scale_attn_by_inverse_layer_idx=True, **fields)


def tiny_decoder(**fields) -> DecoderConfig:
    """A Qwen2-like decoder: grouped-query attention, a sliding window on the second layer only, biases."""
    return DecoderConfig(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=6, max_position_embeddings=32,
                         qkv_bias=True, sliding_window=3, layer_types=("full_attention", "sliding_attention"),
                         **fields)


def batch():
    """Token ids and a mask with right padding, left padding and a full row: ``[3, 11]``."""
    ids = (np.arange(33).reshape(3, 11) * 7 + 5) % 97
    mask = np.ones((3, 11), np.int32)
    mask[1, 8:] = 0
    mask[2, :4] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def init_params(config, hidden_fn_module):
    dummy = jnp.ones((1, 2), jnp.int32)
    return jax.jit(lambda key: hidden_fn_module(config).init(key, dummy, dummy)["params"])(jax.random.key(1))


MODELS = {"gpt2": (tiny_gpt2, gpt2.GPT2, gpt2.hidden_fn), "decoder": (tiny_decoder, decoder.DecoderModel,
                                                                       decoder.hidden_fn)}


def hidden_and_grads(hidden_fn, config, params, ids, mask):
    """Hidden states and the gradient of a scalar of them with respect to every parameter."""
    def scalar(p):
        hidden = hidden_fn(config, p, ids, mask)
        return jnp.sum(jnp.sin(hidden) * mask[..., None]), hidden
    (_, hidden), grads = jax.jit(jax.value_and_grad(scalar, has_aux=True))(params)
    return hidden, grads


@pytest.mark.parametrize("family", sorted(MODELS))
def test_scanned_unrolled_remat_and_chunked_give_the_same_states_and_gradients(family):
    make, module, hidden_fn = MODELS[family]
    config = make()
    params = init_params(config, module)
    ids, mask = batch()
    want_hidden, want_grads = hidden_and_grads(hidden_fn, config, params, ids, mask)
    assert np.abs(np.asarray(want_hidden)).max() > 0.1
    execution = EXECUTIONS[family]
    got_hidden, got_grads = hidden_and_grads(hidden_fn, dataclasses.replace(config, **execution), params, ids, mask)
    np.testing.assert_allclose(got_hidden, want_hidden, atol=2e-6, rtol=0, err_msg=str(execution))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(got, want, atol=2e-5 * scale + 1e-7, rtol=0,
                                   err_msg=f"{execution} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("family", sorted(MODELS))
def test_unrolled_is_loop_free_and_scanned_is_one_loop_over_the_same_parameters(family):
    make, module, hidden_fn = MODELS[family]
    ids, mask = batch()
    programs = {}
    for scan in (True, False):
        config = make(scan_layers=scan)
        params = init_params(config, module)
        programs[scan] = jax.jit(hidden_fn, static_argnums=0).lower(config, params, ids, mask).as_text()
        shapes = jax.tree.map(np.shape, params)
        programs[scan, "shapes"] = shapes
    assert programs[True, "shapes"] == programs[False, "shapes"]
    assert "while" in programs[True] and "while" not in programs[False]


def test_one_orbax_checkpoint_restores_into_scanned_and_unrolled_models(tmp_path):
    ids, mask = batch()
    scanned = tiny_gpt2()
    params = init_params(scanned, gpt2.GPT2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", params)
    checkpointer.wait_until_finished()
    hidden = jax.jit(gpt2.hidden_fn, static_argnums=0)
    want = hidden(scanned, params, ids, mask)
    for execution in ({}, {"scan_layers": False, "remat": "full"}):
        config = dataclasses.replace(scanned, **execution)
        abstract = jax.eval_shape(lambda c=config: init_params(c, gpt2.GPT2))
        restored = checkpointer.restore(tmp_path / "ckpt", abstract)
        np.testing.assert_allclose(hidden(config, restored, ids, mask), want, atol=2e-6, rtol=0)



def test_execution_fields_stay_out_of_hf_configs_and_are_checked():
    config = tiny_gpt2(remat="dots", attention="chunked", scan_layers=False)
    written = gpt2.hf_config_dict(config)
    assert not set(layers.EXECUTION_FIELDS) & set(written)
    assert gpt2.config_from_hf(written) == dataclasses.replace(config, remat="none", attention="xla",
                                                               scan_layers=True)
    assert not set(layers.EXECUTION_FIELDS) & set(llama.hf_config_dict(tiny_decoder(remat="full")))
    for bad, message in ((dict(remat="some"), "remat='some'"), (dict(attention="flash"), "attention='flash'"),
                         (dict(attention_chunk=0), "attention_chunk")):
        with pytest.raises(SentcompError, match=message):
            tiny_gpt2(**bad)
        with pytest.raises(SentcompError, match=message):
            tiny_decoder(**bad)


def test_with_execution_rebinds_a_loaded_model():
    config = tiny_decoder()
    lm = decoder.language_model("qwen2", config, init_params(config, decoder.DecoderModel), None, "tiny")
    chunked = layers.with_execution(lm, attention="chunked", attention_chunk=4, remat="full")
    assert chunked.config.attention == "chunked" and chunked.hidden_fn.args[0] is chunked.config
    ids, mask = batch()
    np.testing.assert_allclose(chunked.hidden(ids, mask), lm.hidden(ids, mask), atol=2e-6, rtol=0)
    with pytest.raises(SentcompError, match="not \\['n_layer'\\]"):
        layers.with_execution(lm, n_layer=2)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN is available on a GPU")
def test_cudnn_attention_off_gpu_is_a_clear_error():
    ids, mask = batch()
    config = tiny_gpt2(attention="cudnn")
    with pytest.raises(SentcompError, match="needs an NVIDIA GPU.*attention='xla'"):
        gpt2.hidden_fn(config, init_params(tiny_gpt2(), gpt2.GPT2), ids, mask)


# ---------------------------------------------------------------------------------- attention against numpy


def numpy_attention(q, k, v, mask, scale, window):
    """float64 causal attention with grouped heads, padding and a sliding window over real-token positions; a
    query that sees no key averages every value (the finite-mask convention)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    batch, length, heads, _ = q.shape
    groups = heads // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(batch):
        position = np.maximum(np.cumsum(mask[b]) - 1, 0)
        for t in range(length):
            visible = np.array([mask[b, s] and s <= t and (window is None or position[t] - position[s] < window)
                                for s in range(length)])
            for h in range(heads):
                scores = scale * k[b, :, h // groups] @ q[b, t, h]
                weights = np.exp(scores - scores[visible].max()) * visible if visible.any() else np.ones(length)
                out[b, t, h] = weights @ v[b, :, h // groups] / weights.sum()
    return out.reshape(batch, length, -1)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_float64_numpy_with_gqa_padding_and_windows(implementation, window):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 10, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(3, 10, 2, 8)).astype(np.float32) for _ in range(2))
    mask = np.ones((3, 10), np.int32)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding: its first queries see no key at all
    got = layers.self_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), scale=0.7,
                                causal=True, window=window, implementation=implementation, chunk=4)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, numpy_attention(q, k, v, mask, 0.7, window), atol=2e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_bf16_attention_softmaxes_in_float32_and_returns_bf16(implementation):
    """bf16 inputs: scores and softmax in float32, so the error is that of the bf16 weights and output (a few
    1e-3), not of a bf16 softmax; the result is bf16."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 64, 2, 16)).astype(jnp.bfloat16) for _ in range(3))
    mask = np.ones((2, 64), np.int32)
    got = layers.self_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), scale=0.25,
                                causal=True, implementation=implementation, chunk=16)
    assert got.dtype == jnp.bfloat16
    want = numpy_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), mask, 0.25, None)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2, rtol=0)


def temp_bytes(implementation: str, length: int, grad: bool) -> int:
    """XLA's temporaries of causal attention (1 sequence, 2 heads of 16) over ``length`` tokens, forward or
    forward + backward."""
    shape = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)

    def attention(q, k, v, mask):
        return layers.self_attention(q, k, v, mask, scale=0.25, causal=True, implementation=implementation,
                                     chunk=128)

    fn = jax.grad(lambda *args: attention(*args).sum(), argnums=(0, 1, 2)) if grad else attention
    compiled = jax.jit(fn).lower(shape, shape, shape, jax.ShapeDtypeStruct((1, length), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_attention_memory_grows_linearly_while_dense_grows_quadratically():
    dense = temp_bytes("xla", 1024, False) / temp_bytes("xla", 512, False)
    chunked = temp_bytes("chunked", 1024, False) / temp_bytes("chunked", 512, False)
    chunked_grad = temp_bytes("chunked", 1024, True) / temp_bytes("chunked", 512, True)
    assert dense > 3.5 and chunked < 2.3 and chunked_grad < 2.3, (dense, chunked, chunked_grad)
