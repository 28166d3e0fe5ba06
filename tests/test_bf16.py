"""bfloat16 is really bfloat16: with bf16-cast parameters (``cast_floats(params, jnp.bfloat16)``, what
``compute_dtype="bfloat16"`` does), every matrix product of every family's forward pass takes bf16 operands and
f(s) comes out bf16, close to the float32 forward pass; with float32 parameters the same walk finds float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from sentcomp.features import last_token_features
from sentcomp.models import bert, decoder, gpt2, llama
from sentcomp.models.base import cast_floats

LENGTH = 7
MAX_RELATIVE_ERROR = 5e-2  # of f(s) at the last token, bf16 forward pass against float32's


def _gpt2(quad_head):
    config = gpt2.gpt2_config(vocab_size=50257, n_embd=32, n_head=4, n_layer=2, n_positions=16)
    return gpt2.init(config, rng=0, quad_head=quad_head)


def _llama(tied, quad_head=False):
    config = llama.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16,
                               tie_word_embeddings=tied)
    return llama.init(config, 0, quad_head=quad_head)


def _decoder(family, **fields):
    """A tiny random model of a rotary decoder family, its config's switches set as the family's loader does."""
    sizes = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=16, tie_word_embeddings=False)
    return decoder.init(family, decoder.DecoderConfig(**{**sizes, **fields}), 0)


def _bert():
    config = bert.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=40, max_position_embeddings=16)
    return bert.init(config, 0)


MODELS = {
    "gpt2": lambda: _gpt2(quad_head=False),
    "gpt2-quad": lambda: _gpt2(quad_head=True),
    "llama-tied": lambda: _llama(tied=True),
    "llama-untied": lambda: _llama(tied=False),
    "llama-quad": lambda: _llama(tied=False, quad_head=True),
    "bert": _bert,
    "qwen2-sliding": lambda: _decoder("qwen2", qkv_bias=True, sliding_window=3),
    "gpt_neox": lambda: _decoder("gpt_neox", num_key_value_heads=4, norm="layer", mlp="plain", hidden_act="gelu",
                                 mlp_bias=True, qkv_bias=True, output_bias=True, fused_qkv=True,
                                 parallel_residual=True, partial_rotary_factor=0.25),
    "gemma": lambda: _decoder("gemma", head_dim=10, norm="rms_plus_one", scale_embeddings=True,
                              hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def lm(request):
    return MODELS[request.param]()


def _batch():
    """Three right-padded sequences of ids below 61 (every tiny vocabulary here)."""
    ids = np.random.default_rng(0).integers(0, 61, (3, LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH) < np.array([[LENGTH], [4], [1]])).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def _sub_jaxprs(value):
    """The jaxprs inside an equation parameter (pjit/custom_jvp/custom_vjp/scan/remat bodies, cond branches)."""
    if isinstance(value, jax_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every ``dot_general`` in ``jaxpr`` and the jaxprs nested in its equations."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(var.aval.dtype) for var in eqn.invars))
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found.extend(dot_operand_dtypes(sub))
    return found


def _traced(lm, dtype):
    ids, mask = _batch()
    closed = jax.make_jaxpr(lm.hidden_fn)(cast_floats(lm.params, dtype), ids, mask)
    return dot_operand_dtypes(closed.jaxpr), closed.out_avals[0].dtype


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_every_matmul_runs_in_the_parameters_dtype(lm, dtype):
    """Dense projections, QKᵀ, attention·V, the MLP and the Quad head: all take operands of the parameters'
    dtype (bf16 norms' outputs, bf16 residual stream, attention weights cast back to bf16 before ·V)."""
    dots, out_dtype = _traced(lm, dtype)
    assert len(dots) >= 6, dots  # the walk reached the blocks' matmuls (Llama's are inside the layer scan)
    wrong = [operands for operands in dots if set(operands) != {jnp.dtype(dtype).name}]
    assert not wrong, f"{len(wrong)} of {len(dots)} dot_generals have operands {sorted(set(wrong))}"
    assert out_dtype == dtype


def test_bfloat16_forward_pass_is_close_to_float32(lm):
    """f(s) at the last real token: relative error of the bf16 forward pass below MAX_RELATIVE_ERROR (and not
    0: bf16 really ran)."""
    ids, mask = _batch()
    hidden = jax.jit(lm.hidden_fn)
    full = np.asarray(last_token_features(hidden(lm.params, ids, mask), mask))
    half = last_token_features(hidden(cast_floats(lm.params, jnp.bfloat16), ids, mask), mask)
    assert half.dtype == jnp.bfloat16
    error = np.linalg.norm(np.asarray(half, np.float32) - full, axis=-1) / np.linalg.norm(full, axis=-1)
    assert np.all(error < MAX_RELATIVE_ERROR) and np.all(error > 1e-5), error
