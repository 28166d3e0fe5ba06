"""A model family added in a test, with nothing edited outside its own definition and the registry
(``sentcomp.models.FAMILIES``): this module *is* the family (``FAMILY``, ``FACTS``, ``config_from_hf``, ``init``,
``save_hf``, ``from_hf``), registered for each test, and it works with the FLOPs count (against a hand count),
untying Φ, fine-tuning and pretraining (tiny sizes).

The toy: token and position embeddings (lookups), one causal single-head attention layer with a residual,
``f(s) = x + softmax(causal(q kᵀ/√d)) v W_o`` with ``q, k, v = x W_q, x W_k, x W_v``, and Φ tied to the token
embeddings (``tok``) or untied (``out``)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sentcomp import models
from sentcomp.data.loaders import Split
from sentcomp.launcher import config_files, runner
from sentcomp.models import hf
from sentcomp.models.base import FamilyFacts, LanguageModel
from sentcomp.models.tokenizers import byte_tokenizer
from sentcomp.training import finetune, throughput

FAMILY = "toy_attention"  # the model_type of the toy family
V, D, T = 257, 16, 32  # bytes, width, context


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    # pretraining sets the execution fields of sentcomp.models.layers on every model; the toy runs one way only
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "xla"
    attention_chunk: int = 512


def config_from_hf(hf_config: dict) -> ToyConfig:
    return ToyConfig(hf_config["vocab_size"], hf_config["hidden_size"], hf_config["max_position_embeddings"],
                     bool(hf_config.get("tie_word_embeddings", True)))


def hidden_fn(config: ToyConfig, params, token_ids, attention_mask):
    x = params["tok"]["embedding"][token_ids] + params["pos"]["embedding"][: token_ids.shape[1]]
    attn = params["attn"]
    q, k, v = x @ attn["q"], x @ attn["k"], x @ attn["v"]
    scores = jnp.einsum("btd,bsd->bts", q, k) / math.sqrt(config.hidden_size)
    causal = jnp.tril(jnp.ones((token_ids.shape[1],) * 2, bool))[None] & attention_mask[:, None, :].astype(bool)
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    return x + jnp.einsum("bts,bsd->btd", weights, v) @ attn["o"]


def phi_fn(params):
    return params["out"] if "out" in params else params["tok"]["embedding"]


def language_model(config: ToyConfig, params, tokenizer, name: str) -> LanguageModel:
    return LanguageModel(name=name, family=FAMILY, config=config, params=params,
                         hidden_fn=functools.partial(hidden_fn, config), phi_fn=phi_fn, tokenizer=tokenizer,
                         max_length=config.max_position_embeddings)


def init(config: ToyConfig, rng=0, quad_head: bool = False, tokenizer=None) -> LanguageModel:
    if quad_head:
        raise NotImplementedError("The toy family has no Quad head.")
    keys = iter(jax.random.split(jax.random.key(rng) if isinstance(rng, int) else rng, 7))
    d = config.hidden_size

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape)

    params = {"tok": {"embedding": normal(config.vocab_size, d)},
              "pos": {"embedding": normal(config.max_position_embeddings, d)},
              "attn": {name: normal(d, d) * 10 for name in ("q", "k", "v", "o")}}
    if not config.tie_word_embeddings:
        params["out"] = normal(config.vocab_size, d)
    return language_model(config, params, tokenizer, f"{FAMILY}-random")


def untie(lm: LanguageModel) -> LanguageModel:
    config = dataclasses.replace(lm.config, tie_word_embeddings=False)
    return language_model(config, {**lm.params, "out": jnp.array(lm.phi)}, lm.tokenizer, lm.name)


def save_hf(lm: LanguageModel, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    flat = {".".join(path): np.asarray(leaf, np.float32)
            for path, leaf in ((tuple(str(k.key) for k in p), leaf)
                               for p, leaf in jax.tree_util.tree_flatten_with_path(lm.params)[0])}
    save_file(flat, str(directory / "model.safetensors"))
    c = lm.config
    (directory / "config.json").write_text(json.dumps({
        "model_type": FAMILY, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings}))
    return directory


def from_hf(model_dir, config: dict, name: str | None = None, **options) -> LanguageModel:
    params: dict = {}
    for key, value in load_file(str(Path(model_dir) / "model.safetensors")).items():
        *parents, leaf = key.split(".")
        functools.reduce(lambda tree, part: tree.setdefault(part, {}), parents, params)[leaf] = jnp.asarray(value)
    tokenizer = hf.read_tokenizer(Path(model_dir), ("tokenizer.json", "tokenizer_config.json"))
    return language_model(config_from_hf(config), params, tokenizer, name or str(model_dir))


def pretrain_config(model, vocab_size: int) -> dict:
    return {"vocab_size": vocab_size, "hidden_size": model.n_embd, "max_position_embeddings": model.n_positions,
            "tie_word_embeddings": model.tie_word_embeddings}


FACTS = FamilyFacts(input_embedding="tok", lookups=("tok", "pos"), attention_shape=lambda c: (1, c.hidden_size),
                    untied_phi="out", untie=untie, pretrain_config=pretrain_config)


# ------------------------------------------------------------------------------------------------- the tests


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The toy in the registry: ``FAMILIES[FAMILY]`` names this module (the one line a new family adds)."""
    assert sys.modules[__name__].FACTS is FACTS
    monkeypatch.setitem(models.FAMILIES, FAMILY, __name__)


def toy_lm(tie: bool = True) -> LanguageModel:
    config = config_from_hf({"vocab_size": V, "hidden_size": D, "max_position_embeddings": T,
                             "tie_word_embeddings": tie})
    return init(config, rng=0, tokenizer=byte_tokenizer())


def test_the_registry_gives_the_toys_facts():
    assert models.facts(FAMILY) is FACTS and FAMILY in models.causal_families()
    assert isinstance(models.init(FAMILY, {"vocab_size": V, "hidden_size": D, "max_position_embeddings": T}).config,
                      ToyConfig)


@pytest.mark.parametrize("tie", [True, False])
def test_flops_match_a_hand_count(tie):
    """N = the four d × d attention matrices + the output projection Φ (V·d, tied or not); tok and pos are
    lookups. One layer of attention width d."""
    lm = toy_lm(tie)
    n = 4 * D * D + V * D
    assert throughput.matmul_params(lm) == n
    assert throughput.matmul_params(lm, output_projection=False) == 4 * D * D
    assert throughput.attention_shape(lm) == (1, D)
    assert throughput.lm_flops_per_token(lm, T) == 3 * (2 * n + 4 * 1 * T * D)


def test_untying_copies_phi_and_keeps_the_outputs():
    lm = toy_lm(tie=True)
    untied = models.untie(lm)
    assert untied.family == FAMILY and not untied.config.tie_word_embeddings and lm.config.tie_word_embeddings
    assert untied.phi_param == "out" and lm.phi_param == "tok"
    np.testing.assert_array_equal(untied.params["out"], lm.params["tok"]["embedding"])
    ids = np.random.default_rng(0).integers(V, size=(2, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(untied.hidden(ids, mask), lm.hidden(ids, mask))
    assert models.untie(untied) is untied


WORDS = (["fig", "kiwi", "lime", "plum"], ["bed", "desk", "door", "sofa"])


def separable_split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return Split([" ".join(rng.choice(WORDS[label], rng.integers(2, 6))) for label in labels], labels)


@pytest.mark.slow
def test_fine_tuning_runs_with_the_auxiliary_lm_loss(tmp_path):
    config = dict(prompt=" is ", batch_size=16, eval_batch_size=16, eval_every=2, patience=100, val_fraction=0.25,
                  max_length=T, buckets=(T,), progress=False, max_steps=4, aux_lm_weight=0.5,
                  optimizer=dict(learning_rate=3e-3, warmup_steps=1, weight_decay=0.0))
    options = finetune.FinetuneOptions.from_mapping(config)
    results = finetune.finetune_accuracy(toy_lm(), separable_split(48, 0), separable_split(16, 1), options, tmp_path)
    assert 0 <= results["test_accuracy"] <= 1 and results["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    assert all(np.isfinite(row["train_loss"]) and row["mfu"] > 0 for row in rows)


@pytest.mark.slow
def test_pretraining_from_scratch_saves_a_loadable_model(tmp_path):
    config = config_files.override(config_files.load_config(f"{config_files.EXPERIMENTS_DIR}/pretrain.py:smoke"), {
        "model.family": FAMILY, "model.quad_head": False, "model.tie_word_embeddings": True,
        "model.n_positions": T, "model.n_embd": D, "data.seq_len": T, "num_steps": 4, "eval_every": 2,
        "checkpoint.every": 2, "probe.every": 4, "probe.num_train": 40, "probe.num_test": 20, "progress": False})
    results = runner.run_program(config, tmp_path)
    assert np.isfinite(results["train_loss"]) and np.isfinite(results["val_xent"]) and 0 <= results["probe_f"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("mfu", 0) > 0 for row in rows)
    trained = models.load(str(tmp_path))
    assert trained.family == FAMILY and trained.config.hidden_size == D
    assert sorted(trained.params) == ["attn", "pos", "tok"]
