"""Pretraining Llama-family models: a random tiny Llama trains with the Quad loss through the runner (the
``smoke,family=llama`` variant, shrunk), and one loaded from a tied Llama checkpoint directory with cross-entropy
and Φ untied and frozen; a random Llama starts with the Quad head at the identity and Φ untied; a resumed run ends
where an uninterrupted one does; ``model/`` reloads through ``sentcomp.models.load`` and through transformers'
``AutoModelForCausalLM`` with the same logits; the other rotary families get their own architecture."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sentcomp import models, parallel
from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files, runner
from sentcomp.models import decoder, tokenizers
from sentcomp.models.base import COMPUTE_DTYPES
from sentcomp.programs import pretrain
from sentcomp.results import layout
from sentcomp.training import steps as training_steps

SPEC = f"{config_files.EXPERIMENTS_DIR}/pretrain.py:smoke,family=llama"
TINY = {  # a 2-layer d=32 byte-level Llama (2 query heads sharing 1 key/value head), 16 steps of 8 × 32 tokens
    "model.n_embd": 32, "model.n_positions": 32, "model.num_key_value_heads": 1, "data.seq_len": 32,
    "num_steps": 16, "batch_size": 8, "eval_every": 4, "eval_blocks": 8, "eval_batch_size": 8,
    "checkpoint.every": 4, "probe.every": 0, "progress": False,
}
TEXTS = ["Stocks fell sharply on Monday.", "A short one."]


def tiny_config(**changes):
    return config_files.override(config_files.load_config(SPEC), {**TINY, **changes})


def flat(params) -> dict[str, np.ndarray]:
    return {"/".join(keys): np.asarray(value) for keys, value in traverse_util.flatten_dict(params).items()}


def batch(lm):
    encoded = lm.tokenizer(TEXTS, padding=True, return_tensors="np")
    return encoded["input_ids"], encoded["attention_mask"]


def transformers_outputs(model_dir, ids, mask):
    """transformers' ``AutoModelForCausalLM`` on ``model_dir``: its final-norm hidden states and logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hidden = model.model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        logits = model.lm_head(hidden)
    return hidden.numpy(), logits.numpy()


def train_steps(lm, config, steps: int):
    """``steps`` optimiser steps of ``lm`` as ``config`` says on one fixed random batch: the losses, the final and
    the initial parameters."""
    initial = jax.tree.map(np.array, lm.params)  # the step donates its input state
    mesh = parallel.data_mesh()
    frozen = lm.phi_param if config.init.freeze_phi else None
    optimizer = training_steps.make_optimizer(config.optimizer, config.num_steps, lm.params, frozen)
    state = training_steps.initial_state(lm.params, optimizer, mesh)
    step_fn = training_steps.make_train_step(config.loss, lm.hidden_fn, lm.phi_fn, optimizer,
                                       COMPUTE_DTYPES[config.compute_dtype], mesh)
    tokens = np.random.default_rng(0).integers(0, 257, (config.batch_size, 1, config.data.seq_len + 1), np.int32)
    losses = []
    for _ in range(steps):
        state, metrics = step_fn(state, parallel.shard_batch(tokens, mesh))
        losses.append(float(metrics["loss"]))
    return losses, parallel.fetch(state["params"]), initial


# ------------------------------------------------------------------------------------ config and the model


def test_family_shapes_come_from_config_model():
    base = config_files.load_config(SPEC).model
    assert models.hf_model_config(base, 257) == {
        "vocab_size": 257, "tie_word_embeddings": False, "rope_theta": 10000.0, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
        "intermediate_size": 192, "num_key_value_heads": 2}  # 8·64/3 = 170.7, rounded up to a multiple of 64
    assert decoder.gated_mlp_width(576) == 1536  # SmolLM2-135M's
    neox = config_files.override(base.copy_and_resolve_references(), {"family": "gpt_neox", "num_key_value_heads": 0})
    assert models.hf_model_config(neox, 257)["intermediate_size"] == 256  # GPT-NeoX's plain MLP: 4·d
    small = config_files.load_config(f"{config_files.EXPERIMENTS_DIR}/pretrain.py:family=llama").model
    assert models.hf_model_config(small, 50257)["intermediate_size"] == 2048
    gpt2 = config_files.load_config(f"{config_files.EXPERIMENTS_DIR}/pretrain.py:smoke").model
    assert "rope_theta" not in gpt2 and models.hf_model_config(gpt2, 257)["n_embd"] == 64
    with pytest.raises(SentcompError, match=r"config.model.intermediate_size applies to rotary families"):
        models.hf_model_config(config_files.override(base.copy_and_resolve_references(), {"family": "gpt2"}), 257)
    bert = config_files.load_config(f"{config_files.EXPERIMENTS_DIR}/pretrain.py:smoke,family=bert")
    with pytest.raises(SentcompError, match=r"Unknown config.model.family 'bert'; choose one of \['gpt2', 'llama'"):
        pretrain.check_config(bert)
    with pytest.raises(SentcompError, match="'bert' models cannot be pretrained from random weights"):
        models.hf_model_config(bert.model, 257)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    """A tiny random tied Llama with the byte tokenizer, saved in Hugging Face layout; its embeddings scaled up
    (std 0.2) so that the logits are large enough for errors to show."""
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": 257, "tie_word_embeddings": True}
    lm = models.init("llama", shape, rng=1, tokenizer=tokenizers.byte_tokenizer())
    params = {**lm.params, "embed_tokens": {"embedding": lm.params["embed_tokens"]["embedding"] * 10}}
    return models.save_hf(lm.replace(params=params), tmp_path_factory.mktemp("tied_llama"))


@pytest.mark.slow
def test_xent_from_a_tied_llama_checkpoint_with_frozen_phi(tied_llama_dir, tmp_path):
    """``init.source`` a tied Llama directory with ``tie_word_embeddings=False``: Φ is untied (a copy of the
    embeddings), frozen it stays put while the embeddings and the rest train and the loss falls; the trained
    model saved as the run saves it gives transformers' logits."""
    config = tiny_config(**{"init.source": str(tied_llama_dir), "model.quad_head": False, "init.freeze_phi": True})
    source = models.load(str(tied_llama_dir))
    lm = pretrain.build_model(config)
    assert source.config.tie_word_embeddings and source.phi_param == "embed_tokens"
    assert lm.family == "llama" and not lm.config.tie_word_embeddings and not lm.config.quad_head
    assert lm.phi_param == "lm_head" and lm.config.num_key_value_heads == 1 and lm.max_length == 64
    np.testing.assert_array_equal(lm.phi, source.phi)

    losses, params, initial = train_steps(lm, config, steps=3)
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(params["lm_head"], initial["lm_head"])
    for name, value in flat(params).items():
        assert name == "lm_head" or not np.array_equal(value, flat(initial)[name]), name

    trained = lm.replace(params=params)
    models.save_hf(trained, tmp_path)
    ids, mask = batch(trained)
    _, logits = transformers_outputs(tmp_path, ids, mask)
    ours = np.asarray(jnp.einsum("btd,vd->btv", trained.hidden(ids, mask), trained.phi))
    real = mask.astype(bool)
    assert np.abs(logits[real]).max() > 1.0  # large enough for errors to show
    np.testing.assert_allclose(ours[real], logits[real], atol=1e-4, rtol=0)


def test_random_llama_has_the_quad_head_at_the_identity_and_phi_untied():
    lm = pretrain.build_model(tiny_config())
    assert lm.family == "llama" and lm.config.quad_head and not lm.config.tie_word_embeddings
    assert lm.config.num_key_value_heads == 1 and lm.config.intermediate_size == 128 and lm.max_length == 32
    np.testing.assert_array_equal(lm.params["quad_head"]["kernel"], np.eye(32))
    np.testing.assert_array_equal(lm.params["quad_head"]["bias"], np.zeros(32))
    assert lm.phi_param == "lm_head" and lm.phi.shape == (257, 32)
    assert not np.array_equal(lm.phi, lm.params["embed_tokens"]["embedding"])
    assert models.untie(lm) is lm


@pytest.mark.parametrize("family, kv_heads, architecture", [
    ("qwen2", 1, {"qkv_bias": True, "output_bias": False, "intermediate_size": 128}),
    ("mistral", 1, {"qkv_bias": False, "sliding_window": None, "intermediate_size": 128}),
    ("gemma", 1, {"scale_embeddings": True, "norm": "rms_plus_one", "hidden_act": "gelu_pytorch_tanh"}),
    ("gpt_neox", 2, {"parallel_residual": True, "fused_qkv": True, "mlp": "plain", "partial_rotary_factor": 0.25,
                     "intermediate_size": 128}),
])
def test_other_rotary_families_get_their_own_architecture(family, kv_heads, architecture):
    """config.model as each family's config, with the family's own defaults. No weights are built: the decoder,
    its train step and its saving are the Llama's, tested below, and each family's parity with transformers is
    tested in test_families."""
    config = tiny_config(**{"model.family": family, "model.num_key_value_heads": 0 if family == "gpt_neox" else 1})
    decoder_config = models.family_module(family).config_from_hf(models.hf_model_config(config.model, 257))
    expected = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": kv_heads,
                "max_position_embeddings": 32, "vocab_size": 257, "rope_theta": 10000.0, **architecture}
    assert {key: getattr(decoder_config, key) for key in expected} == expected


def test_gpt_neox_refuses_grouped_query_attention():
    with pytest.raises(SentcompError, match="GPT-NeoX has no grouped-query attention; set config.model.num_key_va"):
        models.hf_model_config(tiny_config(**{"model.family": "gpt_neox"}).model, 257)


# --------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def quad_run(tmp_path_factory):
    """A complete tiny Quad run of a random Llama (the ``smoke,family=llama`` variant, shrunk) through the runner."""
    workdir = tmp_path_factory.mktemp("llama_quad")
    runner.run_program(tiny_config(loss="quad"), workdir)
    return workdir


@pytest.mark.slow
def test_quad_run_trains_and_records(quad_run):
    rows = [json.loads(line) for line in (quad_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 12, 16]
    assert rows[-1]["val_quad"] < rows[0]["val_quad"] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert runner.read_done(quad_run)["steps"] == 16


def test_quad_model_reloads_in_sentcomp_and_transformers(quad_run):
    """transformers computes its logits from the final norm (it ignores the Quad head, sentcomp's own); sentcomp's
    f(s) is that output through the trained head, and both read the same trained Φ."""
    lm = models.load(str(quad_run))
    assert lm.family == "llama" and lm.config.quad_head and lm.phi_param == "lm_head"
    ids, mask = batch(lm)
    hidden, logits = transformers_outputs(quad_run / "model", ids, mask)
    head = lm.params["quad_head"]
    assert not np.allclose(head["kernel"], np.eye(32), atol=1e-3)  # the head trained
    real = mask.astype(bool)
    expected_f = hidden @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(np.asarray(lm.hidden(ids, mask))[real], expected_f[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[real], (hidden @ np.asarray(lm.phi).T)[real], atol=1e-4, rtol=0)


def test_resumed_run_ends_with_the_uninterrupted_parameters(quad_run, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(quad_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / "16")
    (workdir / layout.DONE_FILE).unlink()
    runner.run_program(tiny_config(loss="quad"), workdir)  # resumes from step 12
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12, 16]
    expected = flat(models.load(str(quad_run)).params)
    for name, value in flat(models.load(str(workdir)).params).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


