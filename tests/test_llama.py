"""The Flax Llama against Hugging Face's PyTorch LlamaForCausalLM, and its padding/config behaviour."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llama_testing import LLAMA3_SCALING, SENTENCES, assert_long_context_logits_match, hf_logits, tiny_hf_llama

from sentcomp import parallel
from sentcomp.errors import SentcompError
from sentcomp.models import hf, llama, load
from sentcomp.models.base import cast_floats


def our_logits(lm, token_ids, attention_mask) -> np.ndarray:
    hidden = lm.hidden(jnp.asarray(token_ids), jnp.asarray(attention_mask))
    return np.asarray(jnp.einsum("btd,vd->btv", hidden, lm.phi))


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_hf_llama_with_gqa_odd_sizes_and_right_padding(tmp_path, tied):
    model = tiny_hf_llama(tmp_path, tie_word_embeddings=tied)
    lm = load(str(tmp_path))
    assert lm.family == "llama" and lm.config.num_key_value_heads == 2 and lm.config.tie_word_embeddings == tied
    assert lm.phi.shape == (301, 36)
    batch = lm.tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert lm.tokenizer.padding_side == "right" and mask[:, 0].all() and not mask.all()  # real right padding
    expected = hf_logits(model, ids, mask)
    got = our_logits(lm, ids, mask)
    real = mask.astype(bool)
    assert np.abs(expected[real]).max() > 1.0  # logits large enough for errors to show
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 3.0}, LLAMA3_SCALING])
def test_rope_scaling_matches_hf(tmp_path, scaling):
    """Scaled rotary frequencies (Llama 3.1's llama3, linear) over 60 positions: logits as HF's, and not
    those of the unscaled model with the same weights."""
    model = tiny_hf_llama(tmp_path / "scaled", tie_word_embeddings=False, rope_scaling=scaling)
    plain = tiny_hf_llama(tmp_path / "plain", tie_word_embeddings=False)
    lm = load(str(tmp_path / "scaled"))
    assert lm.config.rope_type == scaling["rope_type"] and lm.config.rope_factor == scaling["factor"]
    assert_long_context_logits_match(lm, model, plain)


def test_save_hf_round_trips_through_transformers(tmp_path):
    """A llama3-scaled, untied Llama loaded and written back with save_hf: transformers' AutoModelForCausalLM
    reads the export with the original logits over 60 positions (the rotary scaling survives the config)."""
    from transformers import AutoModelForCausalLM

    model = tiny_hf_llama(tmp_path / "original", tie_word_embeddings=False, rope_scaling=LLAMA3_SCALING)
    llama.save_hf(load(str(tmp_path / "original")), tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = (np.arange(60)[None] * 7 + 3) % 301
    np.testing.assert_allclose(hf_logits(exported, ids, np.ones_like(ids)), hf_logits(model, ids, np.ones_like(ids)),
                               atol=1e-5, rtol=0)


@pytest.mark.slow
def test_quad_head_starts_as_the_pretrained_model(tmp_path):
    tiny_hf_llama(tmp_path, tie_word_embeddings=True)
    plain, quad = load(str(tmp_path)), load(str(tmp_path), quad_head=True)
    assert quad.config.quad_head and not quad.config.tie_word_embeddings and "lm_head" in quad.params
    np.testing.assert_array_equal(quad.phi, plain.phi)
    ids = plain.tokenizer(SENTENCES[:2], padding=True, return_tensors="np")
    np.testing.assert_allclose(
        quad.hidden(ids["input_ids"], ids["attention_mask"]), plain.hidden(ids["input_ids"], ids["attention_mask"]),
        atol=1e-6,
    )
    random_quad = llama.init(quad.config, 0, quad_head=True)
    assert random_quad.params["quad_head"]["kernel"].shape == (36, 36) and random_quad.phi.shape == (301, 36)


@pytest.mark.slow
def test_random_init_features_do_not_depend_on_padding_or_sharding():
    config = llama.LlamaConfig(
        vocab_size=53, hidden_size=20, intermediate_size=37, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=32, tie_word_embeddings=False,
    )
    lm = llama.init(config, jax.random.key(1))
    assert lm.phi.shape == (53, 20) and lm.params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 20, 4)
    ids = np.random.default_rng(0).integers(0, 53, (1, 7))
    alone = lm.hidden(ids, np.ones_like(ids))[0]
    right = lm.hidden(np.pad(ids, ((0, 0), (0, 3))), np.pad(np.ones_like(ids), ((0, 0), (0, 3))))[0, :7]
    left = lm.hidden(np.pad(ids, ((0, 0), (3, 0))), np.pad(np.ones_like(ids), ((0, 0), (3, 0))))[0, 3:]
    assert np.isfinite(np.asarray(alone)).all() and np.asarray(alone).std() > 0.1
    np.testing.assert_allclose(right, alone, atol=1e-5)
    np.testing.assert_allclose(left, alone, atol=1e-5)
    # Data parallel: a batch split over every device gives the same features as on one device.
    mesh = parallel.data_mesh()
    batch = np.random.default_rng(1).integers(0, 53, (parallel.pad_to_multiple(4, mesh.size), 9))
    batch_mask = (np.arange(9) < np.arange(batch.shape[0])[:, None] % 9 + 1).astype(np.int32)
    sharded_inputs = parallel.replicate(lm.params, mesh), *parallel.shard_batch((batch, batch_mask), mesh)
    sharded = jax.jit(lm.hidden_fn)(*sharded_inputs)
    np.testing.assert_allclose(sharded, lm.hidden(batch, batch_mask), atol=1e-5)


def test_bfloat16_parameters_run_close_to_float32(tmp_path):
    """The forward pass with bf16-cast parameters (``extract_features(compute_dtype="bfloat16")``) runs (the
    residual stream stays bf16 through the layer scan) within a few % of float32's hidden states."""
    tiny_hf_llama(tmp_path, tie_word_embeddings=False)
    lm = load(str(tmp_path))
    batch = lm.tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    hidden = jax.jit(lm.hidden_fn)
    full = np.asarray(hidden(lm.params, ids, mask))
    half = hidden(cast_floats(lm.params, jnp.bfloat16), ids, mask)
    real = batch["attention_mask"].astype(bool)
    error = np.linalg.norm(np.asarray(half, np.float32)[real] - full[real]) / np.linalg.norm(full[real])
    assert 1e-4 < error < 5e-2, error  # bf16 really ran, and stayed close


def test_config_errors_are_clear():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(SentcompError, match="'yarn' is not implemented"):
        llama.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    with pytest.raises(SentcompError, match="low_freq_factor < high_freq_factor"):
        llama.config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "low_freq_factor": 4.0}})
    with pytest.raises(SentcompError, match="multiple of num_key_value_heads"):
        llama.config_from_hf({**base, "num_key_value_heads": 3, "num_attention_heads": 4})
    with pytest.raises(SentcompError, match="intermediate_size"):
        llama.config_from_hf({k: v for k, v in base.items() if k != "intermediate_size"})
    config = llama.config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})
    assert config.rope_theta == 123.0 and config.head_dim == 4 and config.num_key_value_heads == 2
    with pytest.raises(SentcompError, match="head_dim/2 = 2 positive values, got 3"):
        dataclasses.replace(config, rope_freq_divisors=(1.0, 2.0, 3.0))
    with pytest.raises(SentcompError, match="rope_type must be 'default'"):
        dataclasses.replace(config, rope_freq_divisors=(1.0, 2.0), rope_type="linear")


def test_checkpoint_mismatch_and_missing_tokenizer_are_clear(tmp_path):
    tiny_hf_llama(tmp_path, tie_word_embeddings=False)
    config = hf.read_config(tmp_path)
    with pytest.raises(SentcompError, match="intermediate_size|shape"):
        llama.from_hf(tmp_path, {**config, "intermediate_size": 54})
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(SentcompError, match="no tokenizer"):
        llama.from_hf(tmp_path, config)
