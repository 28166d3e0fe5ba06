"""The decoders' key/value cache (sentcomp.models.layers.KVCache): tokens continuing a cached prefix get the
hidden states the whole sequence gives, and k-shot scores read with the shared prefix cached equal the uncached
ones (sentcomp.zeroshot.word_scores)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llama_testing import SENTENCES, tiny_byte_bpe

from sentcomp import zeroshot
from sentcomp.data import text
from sentcomp.data.text import demonstration_prefix
from sentcomp.models import decoder, layers

TOLERANCE = 1e-5


def tiny_decoder(window: int | None = None, tokenizer=None) -> decoder.LanguageModel:
    """Grouped-query attention (4 query heads on 2 key/value heads), 3 layers, optionally a sliding window."""
    config = decoder.DecoderConfig(vocab_size=301, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=6, sliding_window=window,
                                   max_position_embeddings=512)
    return decoder.init("llama", config, 0, tokenizer=tokenizer)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.slow
def test_continuing_a_cache_gives_the_whole_sequences_hidden_states(window):
    """Prefix (9 tokens) cached once for 3 right-padded continuations, then a second continuation step on the
    extended cache (what greedy generation does): each equals hidden_fn over the whole sequence."""
    lm = tiny_decoder(window)
    rng = np.random.default_rng(0)
    prefix, first, second = rng.integers(0, 301, (1, 9)), rng.integers(0, 301, (3, 7)), rng.integers(0, 301, (3, 2))
    first_mask = np.ones((3, 7), np.int32)
    first_mask[1, 4:] = 0  # padding inside the cache: invisible to what follows, positions count real tokens
    whole = np.concatenate([np.repeat(prefix, 3, 0), first, second], axis=1)
    whole_mask = np.concatenate([np.ones((3, 9), np.int32), first_mask, np.ones((3, 2), np.int32)], axis=1)
    expected = np.array(lm.hidden(whole, whole_mask))
    kept = whole_mask.astype(bool)
    expected[~kept] = 0

    _, cache = jax.jit(lm.prefill_fn)(lm.params, jnp.asarray(prefix), jnp.ones((1, 9), jnp.int32))
    assert cache.keys.shape == (3, 1, 9, 2, 6) and cache.length == 9
    extend = jax.jit(lambda params, ids, mask, cache: decoder.DecoderModel(lm.config, keep_kv=True).apply(
        {"params": params}, ids, mask, cache))  # each call one program (op by op, every operation compiles alone)
    first_hidden, extended = extend(lm.params, jnp.asarray(first), jnp.asarray(first_mask), cache)
    assert extended.length == 16 and extended.keys.shape[1] == 3
    second_hidden = jax.jit(lm.continue_fn)(lm.params, extended, jnp.asarray(second), jnp.ones((3, 2), jnp.int32))
    got = np.concatenate([np.zeros((3, 9, 24)), np.asarray(first_hidden), np.asarray(second_hidden)], axis=1)
    got[~kept] = 0
    np.testing.assert_allclose(got[:, 9:], expected[:, 9:], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("fit", [False, True])
def test_kshot_scores_with_the_prefix_cached_equal_the_uncached_scores(monkeypatch, fit):
    """A 3-shot prefix before every text: word_scores with the prefix's keys/values cached (the default) equals
    word_scores reading every row whole (≤ 1e-5), with multi-token words (two scored positions) and one long text
    whose demonstrations truncation cuts (that row cannot use the cache and is read whole); also with the padded
    lengths fitted to each pass's batches (text.fitted_buckets, used from MIN_BATCHES_TO_FIT batches on)."""
    if fit:
        monkeypatch.setattr(text, "MIN_BATCHES_TO_FIT", 1)
    lm = tiny_decoder(tokenizer=tiny_byte_bpe(301))
    prompt, words = " It was", ["gorgeous", "terrible", "fine movie"]
    prefix = demonstration_prefix(SENTENCES[:3], ["great", "bad", "great"], prompt)
    texts = [prefix + text for text in SENTENCES[3:]] + [prefix + " ".join(SENTENCES) * 2]
    rows = zeroshot.build_rows(lm.tokenizer, texts, prompt, words, 400)
    shared = zeroshot.shared_prefix_length(rows)
    continuing = {row.document for row in rows if row.input_ids[:shared] == rows[0].input_ids[:shared]}
    assert shared >= zeroshot.MIN_SHARED_PREFIX and continuing == {0, 1, 2}  # the cached path is really taken ...
    assert any(row.input_ids[:shared] != rows[0].input_ids[:shared] for row in rows)  # ... and the uncached one
    options = dict(prompt=prompt, words=words, max_length=400, batch_size=2, progress=False)
    cached = zeroshot.word_scores(lm, texts, kv_cache=True, **options)
    uncached = zeroshot.word_scores(lm, texts, kv_cache=False, **options)
    assert np.isfinite(uncached).all()
    np.testing.assert_allclose(cached, uncached, atol=TOLERANCE, rtol=0)


def test_no_shared_prefix_means_no_cache():
    """Texts without a common start (k = 0) share fewer than MIN_SHARED_PREFIX tokens: nothing is cached."""
    lm = tiny_decoder(tokenizer=tiny_byte_bpe(301))
    rows = zeroshot.build_rows(lm.tokenizer, SENTENCES, " It was", ["good", "bad"], 64)
    assert zeroshot.shared_prefix_length(rows) == 0


def test_with_execution_rebinds_the_cache_functions():
    """A model run another way (layers.with_execution) gets cache functions of its new config, not the old."""
    lm = layers.with_execution(tiny_decoder(), scan_layers=False)
    assert lm.prefill_fn.args[0].scan_layers is False and lm.continue_fn.args[0].scan_layers is False
