"""Qwen2, Mistral, GPT-NeoX and Gemma (the shared rotary decoder, sentcomp.models.decoder) against Hugging Face
transformers' PyTorch models: tiny random checkpoints with odd sizes saved with ``save_pretrained`` load with
``sentcomp.models.load`` and give transformers' logits on right-padded batches; ``save_hf`` writes them back so
that ``AutoModelForCausalLM.from_pretrained`` gives the same logits; each runs the Table-1 features path; and
unsupported config options are refused by name."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from llama_testing import SENTENCES, hf_logits, tiny_byte_bpe

from sentcomp.data import text
from sentcomp.errors import SentcompError
from sentcomp.features import extract_features
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, override
from sentcomp.models import decoder, gemma, gpt_neox, load, mistral, qwen2
from sentcomp.programs import table1

VOCAB = 301
PROMPT = " This movie is"
BPE_VOCAB = 280  # the byte-level BPE's tokens; the family tokenizers add a few special ones

# (model_type, transformers config) per variant: odd sizes, GQA, head_dim ≠ d/heads where the family allows it,
# sliding windows shorter than the sentences, partial rotary, both residual layouts, tied and untied Φ.
VARIANTS = {
    "qwen2-tied-sliding": ("qwen2", dict(
        hidden_size=36, intermediate_size=53, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen2-untied": ("qwen2", dict(
        hidden_size=36, intermediate_size=53, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
        tie_word_embeddings=False)),
    "mistral": ("mistral", dict(
        hidden_size=40, intermediate_size=47, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
        head_dim=6, sliding_window=4, tie_word_embeddings=False)),
    "gpt_neox-parallel": ("gpt_neox", dict(
        hidden_size=36, intermediate_size=53, num_hidden_layers=2, num_attention_heads=3,
        use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5})),
    "gpt_neox-sequential-tied": ("gpt_neox", dict(
        hidden_size=40, intermediate_size=53, num_hidden_layers=2, num_attention_heads=5,
        use_parallel_residual=False, tie_word_embeddings=True, hidden_act="gelu_new",
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25})),
    "gemma": ("gemma", dict(
        hidden_size=32, intermediate_size=45, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=10)),
}
FAMILY_MODULES = {"qwen2": qwen2, "mistral": mistral, "gpt_neox": gpt_neox, "gemma": gemma}
# each family's own tokenizer class (Mistral's is Llama's), and the tokens its defaults need in the vocabulary
TOKENIZERS = {
    "qwen2": ("Qwen2Tokenizer", ()),
    "mistral": ("LlamaTokenizer", ("▁", "<unk>", "<s>", "</s>")),
    "gpt_neox": ("GPTNeoXTokenizer", ("<|padding|>",)),
    "gemma": ("GemmaTokenizer", ("▁", "<pad>", "<eos>", "<bos>", "<unk>", "<mask>")),
}


def family_tokenizer(family: str):
    """The family's tokenizer class built on a tiny trained byte-level BPE (vocabulary and merges)."""
    class_name, extra = TOKENIZERS[family]
    backend = json.loads(tiny_byte_bpe(BPE_VOCAB).backend_tokenizer.to_str())["model"]
    vocab = dict(backend["vocab"])
    for token in extra:
        vocab.setdefault(token, len(vocab))
    return getattr(transformers, class_name)(vocab=vocab, merges=[tuple(merge) for merge in backend["merges"]])


def tiny_hf_model(directory, family: str, config: dict, seed: int = 0):
    """A random transformers causal LM of ``family``, weights scaled up (std 0.3, random biases and norm gains)
    so that errors would show in the logits, saved with its tokenizer in ``directory``; returns both."""
    hf_config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, max_position_embeddings=64,
                                                  initializer_range=0.3, **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.3)
            elif "norm" in name:  # Gemma stores w of the gain 1 + w
                param.copy_((0.0 if family == "gemma" else 1.0) + 0.5 * torch.randn_like(param))
    tokenizer = family_tokenizer(family)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def our_logits(lm, ids, mask) -> np.ndarray:
    return np.asarray(jnp.einsum("btd,vd->btv", lm.hidden(jnp.asarray(ids), jnp.asarray(mask)), lm.phi))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, family, PyTorch model, its tokenizer, our model loaded from their directory, right-padded batch)."""
    family, config = VARIANTS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model, tokenizer = tiny_hf_model(directory, family, config)
    lm = load(str(directory))
    batch = lm.tokenizer(SENTENCES, padding=True, return_tensors="np")
    return request.param, family, model, tokenizer, lm, (batch["input_ids"], batch["attention_mask"])


def test_logits_match_transformers_on_right_padded_batches(variant):
    name, family, model, tokenizer, lm, (ids, mask) = variant
    assert lm.family == family and lm.tokenizer(SENTENCES)["input_ids"] == tokenizer(SENTENCES)["input_ids"]
    assert lm.tokenizer.padding_side == "right" and mask[:, 0].all() and not mask.all()  # real right padding
    assert lm.phi.shape == (VOCAB, lm.config.hidden_size)
    expected, got = hf_logits(model, ids, mask), our_logits(lm, ids, mask)
    real = mask.astype(bool)
    assert np.abs(expected[real]).max() > 1.0  # logits large enough for errors to show
    print(f"{name}: max |Δ logits| = {np.abs(got[real] - expected[real]).max():.2e}")
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)
    if lm.config.sliding_window is not None:  # the window mattered: without it the logits differ
        config = dataclasses.replace(lm.config, sliding_window=None)
        unlimited = decoder.language_model(family, config, lm.params, lm.tokenizer, lm.name)
        assert np.abs(our_logits(unlimited, ids, mask)[real] - expected[real]).max() > 0.1


def test_save_hf_round_trips_through_transformers(variant, tmp_path):
    """sentcomp -> save_hf -> AutoModelForCausalLM.from_pretrained: transformers' logits are the original
    model's; and sentcomp loads the export back with the same config, tokenizer and logits."""
    name, family, model, _, lm, (ids, mask) = variant
    FAMILY_MODULES[family].save_hf(lm, tmp_path)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(exported, ids, mask)[real], hf_logits(model, ids, mask)[real], atol=1e-5)
    back = load(str(tmp_path))
    assert back.config == lm.config and type(back.tokenizer) is type(lm.tokenizer)
    np.testing.assert_allclose(our_logits(back, ids, mask), our_logits(lm, ids, mask), atol=1e-6)


@pytest.mark.parametrize("variant", ["qwen2-tied-sliding", "mistral", "gpt_neox-parallel", "gemma"], indirect=True)
def test_table1_features_run_on_each_family(variant):
    """The Table-1 features path with the paper's prompt: f(s) (at the last token of text + prompt, as each text
    alone gives it) and Φp_f = Φᵀ softmax(Φf), through extract_features."""
    lm = variant[4]
    out = extract_features(lm, SENTENCES, kinds=("f", "phi_p_f"), prompt=PROMPT, progress=False, batch_size=8,
                           buckets=[lm.max_length])  # one bucket: one compilation
    rows = text.encode_texts(lm.tokenizer, SENTENCES, lm.max_length, PROMPT).token_ids
    lengths = np.array([len(row) for row in rows])
    ids = np.stack([np.pad(row, (0, lengths.max() - len(row))) for row in rows])
    hidden = lm.hidden(ids, (np.arange(lengths.max()) < lengths[:, None]).astype(np.int32))
    np.testing.assert_allclose(out["f"], np.asarray(hidden)[np.arange(len(rows)), lengths - 1], atol=1e-4)
    phi = np.asarray(lm.phi, np.float64)
    logits = out["f"].astype(np.float64) @ phi.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(out["phi_p_f"], (p / p.sum(1, keepdims=True)) @ phi, atol=1e-4)


@pytest.mark.parametrize("variant", ["qwen2-tied-sliding", "mistral", "gpt_neox-parallel", "gemma"], indirect=True)
def test_table1_smoke_runs_on_each_family(variant, tmp_path):
    """The Table-1 program on the family's checkpoint directory (experiments/table1.py:smoke, real Rotten
    Tomatoes snippets): both rows of f(s) and Φp_f probes, and zero-shot completion with the label words."""
    config = override(load_config(f"{EXPERIMENTS_DIR / 'table1.py'}:smoke"), {
        "model": variant[4].name, "columns": ("f", "phi_p_f"), "n_train": 24, "n_test": 12})
    headline = table1.run(config, tmp_path)
    rows = ("rotten_tomatoes", "rotten_tomatoes*")
    assert set(headline) == {f"{row}/{column}" for row in rows for column in ("f", "phi_p_f")} | {
        "rotten_tomatoes*/zeroshot"}
    assert all(0.0 <= accuracy <= 1.0 for accuracy in headline.values())


@pytest.mark.parametrize("variant", ["gemma"], indirect=True)
def test_quad_head_round_trips_and_transformers_ignores_it(variant, tmp_path):
    """A Gemma with the Quad head (perturbed, to check its orientation): save_hf stores it for sentcomp, which
    loads it back with the same f(s); transformers loads the rest and computes the plain model's logits."""
    _, _, model, _, plain, (ids, mask) = variant
    lm = load(plain.name, quad_head=True)
    rng = np.random.default_rng(0)
    d = lm.config.hidden_size
    head = {"kernel": jnp.asarray(rng.normal(size=(d, d)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=d), jnp.float32)}
    lm = lm.replace(params={**lm.params, "quad_head": head})
    gemma.save_hf(lm, tmp_path)
    back = load(str(tmp_path))
    assert back.config.quad_head and not back.config.tie_word_embeddings
    np.testing.assert_allclose(back.hidden(ids, mask), lm.hidden(ids, mask), atol=1e-5)
    with pytest.raises(SentcompError, match="quad_head=False"):
        load(str(tmp_path), quad_head=False)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(exported, ids, mask)[real], hf_logits(model, ids, mask)[real], atol=1e-5)


def test_pythia_style_checkpoint_names_and_config():
    """Pythia's own files: ``embed_out``, mask and rotary buffers, ``rotary_pct``/``rotary_emb_base``."""
    pythia = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
              "num_attention_heads": 2, "rotary_pct": 0.25, "rotary_emb_base": 1000, "use_parallel_residual": True}
    config = gpt_neox.config_from_hf(pythia)
    assert (config.rotary_dim, config.rope_theta, config.parallel_residual) == (2, 1000.0, True)
    lm = gpt_neox.init(config, 0)
    state = decoder.state_dict_from_params(lm.params, config, gpt_neox.NAMES)
    assert "embed_out.weight" in state and state["gpt_neox.layers.0.attention.query_key_value.weight"].shape == (48, 16)
    buffers = {"gpt_neox.layers.0.attention.bias": np.ones((1, 1, 4, 4)),
               "gpt_neox.layers.0.attention.masked_bias": np.zeros(()),
               "gpt_neox.layers.0.attention.rotary_emb.inv_freq": np.ones(1)}
    renamed = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in state.items()}  # transformers 5
    for checkpoint in ({**state, **buffers}, renamed):
        params = decoder.params_from_state_dict(checkpoint, config, gpt_neox.NAMES, "pythia")
        np.testing.assert_array_equal(params["lm_head"], lm.params["lm_head"])


@pytest.mark.parametrize("family,config,message", [
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not implemented"),
    ("qwen2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ("mistral", {"layer_types": ["sliding_attention"]}, "layer_types"),
    ("mistral", {"rope_parameters": {"full_attention": {"rope_theta": 1.0}}}, "per-layer-type rope_parameters"),
    ("gemma", {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
     "final_logit_softcapping=30.0 .*attn_logit_softcapping=50.0"),
    ("gemma", {"use_bidirectional_attention": True}, "bidirectional"),
    ("gemma", {"hidden_act": "relu6"}, "hidden_act='relu6' is not supported"),
    ("gpt_neox", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not implemented"),
    ("gpt_neox", {"rotary_pct": 0.1}, "positive even number"),
])
def test_unsupported_options_are_refused_by_name(family, config, message):
    base = {"vocab_size": 10, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    with pytest.raises(SentcompError, match=message):
        FAMILY_MODULES[family].config_from_hf({**base, **config})


def test_other_model_types_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(SentcompError, match="Unsupported model_type 'gemma2'.*'gemma'"):
        load(str(tmp_path))
