"""Flax GPT-2 against HF transformers' PyTorch GPT2LMHeadModel, and the checkpoint loader's error paths."""

import json
import time

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from sentcomp import models
from sentcomp.errors import SentcompError
from sentcomp.models import gpt2

# Unusual shapes: odd head counts, head_dim not a power of two, short contexts, non-default MLP width,
# activation, epsilon, attention scaling and an untied output embedding. initializer_range is large so the
# logits are far from zero and a wrong detail shows.
HF_CONFIGS = {
    "odd_heads_inverse_layer_scale": dict(n_embd=30, n_head=5, n_layer=2, n_positions=12,
                                          scale_attn_by_inverse_layer_idx=True, initializer_range=0.3),
    "untied_exact_gelu_unscaled": dict(n_embd=24, n_head=3, n_layer=2, n_positions=20, n_inner=40,
                                       activation_function="gelu", layer_norm_epsilon=1e-3, scale_attn_weights=False,
                                       tie_word_embeddings=False, initializer_range=0.2),
}
TEXTS = ["The movie was a triumph of style over substance.", "Bof.", "Ünïcödé and emoji 🎬 make byte-level BPE work."]


def _save_hf_model(directory, config_kwargs, safe_serialization, seed=0):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, **config_kwargs)).eval()
    if safe_serialization:
        model.save_pretrained(directory)
    else:  # transformers 5 only writes safetensors; a legacy checkpoint is a pickled state dict
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return model


def _right_padded_batch(tokenizer, texts, max_length):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tokenizer.eos_token_id, np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    assert mask.min() == 0, "the batch must contain right padding"
    return ids, mask


@pytest.mark.parametrize("name,safe_serialization", [("odd_heads_inverse_layer_scale", True),
                                                     ("untied_exact_gelu_unscaled", False)])
def test_hidden_states_and_logits_match_transformers(tmp_path, name, safe_serialization):
    hf_model = _save_hf_model(tmp_path, HF_CONFIGS[name], safe_serialization)
    assert (tmp_path / ("model.safetensors" if safe_serialization else "pytorch_model.bin")).is_file()
    lm = models.load(str(tmp_path))
    assert lm.family == "gpt2" and lm.max_length == HF_CONFIGS[name]["n_positions"]
    assert len(lm.tokenizer) == 50257  # the real GPT-2 tokenizer (no tokenizer files were saved)
    ids, mask = _right_padded_batch(lm.tokenizer, TEXTS, lm.max_length)

    with torch.no_grad():
        ours_in = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        theirs_hidden = hf_model.transformer(**ours_in).last_hidden_state.numpy()
        theirs_logits = hf_model(**ours_in).logits.numpy()
    hidden = np.asarray(lm.hidden(ids, mask))
    logits = np.asarray(jax.jit(gpt2.logits_fn, static_argnums=0)(lm.config, lm.params, ids, mask))
    real = mask.astype(bool)
    assert np.abs(theirs_logits[real]).max() > 1.0
    np.testing.assert_allclose(hidden[real], theirs_hidden[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[real], theirs_logits[real], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(lm.phi), hf_model.lm_head.weight.detach().numpy())


def test_left_padding_gives_the_unpadded_features():
    """Positions count real tokens: a left-padded row's features equal the same text alone (HF would need
    explicit position_ids for that)."""
    lm = gpt2.init(gpt2.gpt2_config(n_embd=24, n_head=3, n_layer=2, n_positions=32, initializer_range=0.3), rng=1)
    rows = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:3]]
    width = max(map(len, rows))
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    assert mask.min() == 0, "the batch must contain left padding"
    padded = np.asarray(lm.hidden(ids, mask))
    for i, row in enumerate(rows):
        alone = np.asarray(lm.hidden(np.array([row]), np.ones((1, len(row)), np.int32)))[0]
        np.testing.assert_allclose(padded[i, width - len(row):], alone, atol=1e-5)


def test_save_hf_round_trips_through_transformers(tmp_path):
    lm = gpt2.init(gpt2.gpt2_config(vocab_size=50257, n_embd=16, n_head=2, n_layer=1, n_positions=8,
                                    initializer_range=0.3), rng=3)
    gpt2.save_hf(lm, tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, mask = _right_padded_batch(lm.tokenizer, TEXTS, 8)
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(jax.jit(gpt2.logits_fn, static_argnums=0)(lm.config, lm.params, ids, mask))
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4, rtol=0)


def test_quad_architecture_is_in_the_params_and_round_trips(tmp_path):
    config = gpt2.gpt2_config(vocab_size=50257, n_embd=16, n_head=4, n_layer=1, n_positions=8)
    lm = gpt2.init(config, rng=0, quad_head=True)
    assert lm.config.quad_head and not lm.config.tie_word_embeddings
    assert lm.params["quad_head"]["kernel"].shape == (16, 16) and lm.params["quad_head"]["bias"].shape == (16,)
    assert lm.phi.shape == (50257, 16) and not np.allclose(lm.phi, lm.params["wte"]["embedding"])
    # Perturb the head so the round trip checks its orientation (stored [out, in] like torch nn.Linear).
    rng = np.random.default_rng(0)
    params = dict(lm.params)
    params["quad_head"] = {"kernel": rng.normal(size=(16, 16)).astype(np.float32),
                           "bias": rng.normal(size=16).astype(np.float32)}
    lm = lm.replace(params=params)
    gpt2.save_hf(lm, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sentcomp_quad_head"] is True
    loaded = models.load(str(tmp_path))
    ids, mask = _right_padded_batch(lm.tokenizer, TEXTS, 8)
    np.testing.assert_allclose(loaded.hidden(ids, mask), lm.hidden(ids, mask), atol=1e-6)
    np.testing.assert_array_equal(loaded.phi, lm.phi)
    # The head's output is f(s): a linear map of the ln_f output with the stored kernel and bias.
    plain_params = {k: v for k, v in params.items() if k not in ("quad_head", "phi")}
    plain = jax.jit(gpt2.hidden_fn, static_argnums=0)(config, plain_params, ids, mask)
    head = params["quad_head"]
    np.testing.assert_allclose(lm.hidden(ids, mask), plain @ head["kernel"] + head["bias"], atol=1e-5)


def test_plain_checkpoint_loaded_with_quad_head_starts_at_identity(tmp_path):
    _save_hf_model(tmp_path, HF_CONFIGS["odd_heads_inverse_layer_scale"], True)
    plain, quad = models.load(str(tmp_path)), models.load(str(tmp_path), quad_head=True)
    assert "quad_head" in quad.params and "phi" in quad.params
    ids, mask = _right_padded_batch(plain.tokenizer, TEXTS, 12)
    np.testing.assert_allclose(quad.hidden(ids, mask), plain.hidden(ids, mask), atol=1e-6)
    np.testing.assert_array_equal(quad.phi, plain.phi)


@pytest.mark.parametrize("size", ["small", "xl"])
@pytest.mark.parametrize("quad_head", [False, True])
def test_name_map_covers_every_parameter(size, quad_head):
    """The HF name map and the Flax module agree on every tensor and shape (checked without allocating)."""
    config = gpt2.gpt2_config(size, quad_head=quad_head, tie_word_embeddings=not quad_head)
    dummy = jax.numpy.zeros((1, 1), jax.numpy.int32)
    shapes = jax.eval_shape(lambda: gpt2.GPT2(config).init(jax.random.key(0), dummy, dummy)["params"])
    flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    name_map = gpt2.hf_name_map(config)
    stacked = {k: flat[k][1:] for k in flat if k.startswith("h/")}  # block i is index i of the stacked params["h"]
    assert all(flat[k][0] == config.n_layer for k in stacked)
    assert set(flat) == {"/".join(["h", *k.split("/")[2:]]) if k.startswith("h/") else k for k in name_map}
    per_layer = {k: stacked["/".join(["h", *k.split("/")[2:]])] if k.startswith("h/") else flat[k] for k in name_map}
    transposed = {"quad_head/kernel"}
    assert all(per_layer[k] == (shape[::-1] if k in transposed else shape) for k, (_, shape) in name_map.items())
    n_params = sum(int(np.prod(s)) for s in flat.values())
    expected_hf = {"small": 124_439_808, "xl": 1_557_611_200}[size]  # GPT2Model.num_parameters()
    assert n_params == expected_hf + (config.n_embd * (config.n_embd + 1) + 50257 * config.n_embd) * quad_head


def test_checkpoint_problems_are_clear_errors(tmp_path):
    _save_hf_model(tmp_path, HF_CONFIGS["odd_heads_inverse_layer_scale"], True)
    state = load_file(tmp_path / "model.safetensors")
    missing = dict(state)
    missing.pop("transformer.h.1.mlp.c_fc.bias")
    missing["transformer.h.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(SentcompError, match=r"missing tensor 'transformer.h.1.mlp.c_fc.bias'.*unexpected tensor"):
        models.load(str(tmp_path))

    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_inner": 64}))
    with pytest.raises(SentcompError, match=r"mlp.c_fc.weight' has shape \(30, 120\), expected \(30, 64\)"):
        models.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_head": 7}))
    with pytest.raises(SentcompError, match="not divisible by n_head"):
        models.load(str(tmp_path))


def test_hub_name_offline_miss_fails_fast_and_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(SentcompError, match="HF_HUB_OFFLINE"):
        models.load("sentcomp-tests/no-such-gpt2")
    assert time.monotonic() - start < 20  # a hub miss with network access takes ~48 s here


def test_tokenizer_larger_than_vocabulary_is_rejected():
    with pytest.raises(SentcompError, match="tokenizer has 50257 tokens but the model only 1000"):
        gpt2.init(gpt2.gpt2_config(vocab_size=1000, n_embd=8, n_head=2, n_layer=1, n_positions=4))
