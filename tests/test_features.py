"""Feature extraction: word sets, prompt/truncation, float64 references, sharding/batching invariance, cache."""

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import features, kernels, parallel
from sentcomp.data import text
from sentcomp.errors import SentcompError
from sentcomp.models import gpt2

PROMPT = " This movie is "
WORDS = [":)", ":(", "great", "boring", "great", "xqzjv"]
TEXTS = [
    "A gorgeous, witty, seductive movie.",
    "Bad.",
    "The plot is thin, the acting wooden, and the whole thing drags on for what feels like three hours of "
    "nothing in particular, although the score is lovely and the final scene almost redeems it.",
    "Ünïcödé reviewers say: 🎬🎬🎬 out of five.",
    "It is not a bad film, but it is not a good one either.",
    "ok",
    "Charming and sad at the same time; a strong, classic story that never gets boring or terrible.",
]
SMALL_KINDS = ("f", "phi_p_f", "log_z", "word_logits", "word_log_probs", "word_probs")


@pytest.fixture(scope="module")
def lm():
    config = gpt2.gpt2_config(vocab_size=50257, n_embd=24, n_head=3, n_layer=2, n_positions=32, initializer_range=0.3)
    return gpt2.init(config, rng=7)


@pytest.fixture(scope="module")
def baseline(lm):
    return features.extract_features(lm, TEXTS, SMALL_KINDS, words=WORDS, prompt=PROMPT, batch_size=8,
                                     vocab_chunk=5000, progress=False)


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_word_set_keeps_single_token_forms_once(lm):
    tokenizer = lm.tokenizer
    words = text.word_set(tokenizer, WORDS)
    assert words.dropped == ("xqzjv",)
    assert len(set(words.token_ids)) == len(words.token_ids)
    for token_id, form, word in zip(words.token_ids, words.forms, words.source_words):
        assert form in (" " + word, word) and _encode(tokenizer, form) == [token_id]
    for word in set(WORDS) - {"xqzjv"}:  # every single-token form of every word is there
        singles = [f for f in (" " + word, word) if len(_encode(tokenizer, f)) == 1]
        assert singles and all(_encode(tokenizer, f)[0] in words.token_ids for f in singles)
    assert all(len(_encode(tokenizer, f)) > 1 for f in (" xqzjv", "xqzjv"))
    with pytest.raises(SentcompError, match="list of words"):
        text.word_set(tokenizer, "great")


def test_prompt_is_stripped_and_survives_start_truncation(lm):
    tokenizer = lm.tokenizer
    prompt_ids = _encode(tokenizer, PROMPT.rstrip())
    assert _encode(tokenizer, PROMPT)[-1] != prompt_ids[-1]  # a trailing space is its own token: stripping matters
    long_text = TEXTS[2]
    text_ids = _encode(tokenizer, long_text)
    assert len(text_ids) + len(prompt_ids) > 32

    start = text.encode_texts(tokenizer, [long_text, "ok"], 32, PROMPT)
    assert start.n_truncated == 1 and start.prompt == PROMPT.rstrip()
    np.testing.assert_array_equal(start.token_ids[0], text_ids[-(32 - len(prompt_ids)):] + prompt_ids)
    np.testing.assert_array_equal(start.token_ids[1], _encode(tokenizer, "ok") + prompt_ids)

    end = text.encode_texts(tokenizer, [long_text], 32, PROMPT, truncation="end")
    np.testing.assert_array_equal(end.token_ids[0], text_ids[:32])  # the authors' cut: the prompt is lost

    kept = text.encode_texts(tokenizer, ["ok"], 32, PROMPT, keep_prompt_trailing_space=True)
    np.testing.assert_array_equal(kept.token_ids[0], _encode(tokenizer, "ok") + _encode(tokenizer, PROMPT))


def _reference(lm, token_ids, word_ids):
    """Each sequence alone (no padding, no batching), then the feature maths in float64 numpy."""
    phi = np.asarray(lm.phi, np.float64)
    f = np.stack([np.asarray(lm.hidden(ids[None], np.ones((1, len(ids)), np.int32)))[0, -1] for ids in token_ids])
    logits = f.astype(np.float64) @ phi.T
    top = logits.max(-1, keepdims=True)
    log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
    p_f = np.exp(logits - log_z[:, None])
    return {"f": f, "phi_p_f": p_f @ phi, "log_z": log_z, "word_logits": logits[:, word_ids],
            "word_log_probs": logits[:, word_ids] - log_z[:, None], "word_probs": p_f[:, word_ids], "p_f": p_f}


def test_features_match_unbatched_float64_reference(lm, baseline):
    encoding = text.encode_texts(lm.tokenizer, TEXTS, lm.max_length, PROMPT)
    word_ids = list(text.word_set(lm.tokenizer, WORDS).token_ids)
    reference = _reference(lm, encoding.token_ids, word_ids)
    assert reference["p_f"].max() > 10 / 50257  # the distributions are far from uniform: a real check
    for kind in SMALL_KINDS:
        np.testing.assert_allclose(baseline[kind], reference[kind], atol=2e-5, rtol=1e-4, err_msg=kind)
    meta = baseline["metadata"]
    assert meta["n_truncated"] == 1 and meta["prompt"] == PROMPT.rstrip()
    assert meta["words"]["token_ids"] == tuple(word_ids) and meta["words"]["dropped"] == ("xqzjv",)
    assert meta["n_tokens"] == sum(map(len, encoding.token_ids))


@pytest.mark.parametrize("n_devices,batch_size", [(1, 1), (1, 3), (8, 16)])
@pytest.mark.slow
def test_results_do_not_depend_on_batch_size_or_device_count(lm, baseline, n_devices, batch_size):
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    assert mesh.size == n_devices and baseline["metadata"]["n_texts"] == len(TEXTS)
    result = features.extract_features(lm, TEXTS, SMALL_KINDS, words=WORDS, prompt=PROMPT, batch_size=batch_size,
                                       mesh=mesh, progress=False)
    for kind in SMALL_KINDS:
        np.testing.assert_allclose(result[kind], baseline[kind], atol=1e-5, rtol=1e-5, err_msg=kind)


def test_compiles_once_per_length_bucket(lm):
    traces = []

    def counting_hidden_fn(params, token_ids, mask):
        traces.append(token_ids.shape)
        return lm.hidden_fn(params, token_ids, mask)

    counted = lm.replace(hidden_fn=counting_hidden_fn)
    texts = TEXTS * 3  # several batches per bucket
    features.extract_features(counted, texts, ("f",), batch_size=2, buckets=(8, 32),
                              mesh=parallel.data_mesh(jax.devices()[:1]), progress=False)
    assert sorted(traces) == [(2, 8), (2, 32)]


@pytest.mark.slow
def test_full_p_f_goes_to_disk_and_cache_resumes(lm, tmp_path, monkeypatch, baseline):
    kinds = ("f", "word_log_probs", "p_f")
    options = dict(words=WORDS, prompt=PROMPT, batch_size=8, chunk_size=2, cache_dir=tmp_path, progress=False)
    real_compute = features._compute_chunk
    calls = []

    def interrupted_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(features, "_compute_chunk", interrupted_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        features.extract_features(lm, TEXTS, kinds, **options)
    calls.clear()
    monkeypatch.setattr(features, "_compute_chunk", lambda *a, **k: calls.append(1) or real_compute(*a, **k))
    resumed = features.extract_features(lm, TEXTS, kinds, **options)
    assert resumed["metadata"]["computed_chunks"] == [2, 3] and len(calls) == 2  # 4 chunks of 2 texts

    assert isinstance(resumed["p_f"], np.memmap) and resumed["p_f"].shape == (len(TEXTS), 50257)
    encoding = text.encode_texts(lm.tokenizer, TEXTS, lm.max_length, PROMPT)
    reference = _reference(lm, encoding.token_ids, list(text.word_set(lm.tokenizer, WORDS).token_ids))
    np.testing.assert_allclose(resumed["p_f"], reference["p_f"], atol=1e-6, rtol=1e-4)
    for kind in ("f", "word_log_probs"):
        np.testing.assert_allclose(resumed[kind], baseline[kind], atol=1e-5, rtol=1e-5)

    calls.clear()
    again = features.extract_features(lm, TEXTS, ("f", "log_z"), **options)  # only log_z is new
    assert again["metadata"]["computed_chunks"] == [0, 1, 2, 3]
    np.testing.assert_array_equal(again["f"], resumed["f"])
    np.testing.assert_allclose(again["log_z"], baseline["log_z"], atol=1e-5, rtol=1e-5)
    assert features.extract_features(lm, TEXTS, kinds, **options)["metadata"]["computed_chunks"] == []

    other_prompt = features.extract_features(lm, TEXTS, ("f",), **{**options, "prompt": " The sentiment is"})
    assert other_prompt["metadata"]["cache_dir"] != resumed["metadata"]["cache_dir"]
    retrained = lm.replace(params=jax.tree_util.tree_map(lambda x: x * 1.01, lm.params))
    assert features.extract_features(retrained, TEXTS, ("f",), **options)["metadata"]["computed_chunks"] == [0, 1, 2, 3]


def test_damaged_cache_chunks_are_recomputed_and_code_changes_miss_the_cache(lm, baseline, tmp_path, monkeypatch):
    """A chunk whose bytes are wrong but whose shape is right, or a truncated one, is recomputed, not served;
    a change in the code that computes features gives another cache key."""
    options = dict(batch_size=8, chunk_size=4, cache_dir=tmp_path, progress=False, words=WORDS, prompt=PROMPT)
    first = features.extract_features(lm, TEXTS, ("f",), **options)
    key_dir = Path(first["metadata"]["cache_dir"])
    np.save(key_dir / "f.00000.npy", np.zeros_like(first["f"][:4]))  # same shape, wrong bytes
    (key_dir / "f.00001.npy").write_bytes((key_dir / "f.00001.npy").read_bytes()[:50])  # torn
    again = features.extract_features(lm, TEXTS, ("f",), **options)
    assert again["metadata"]["computed_chunks"] == [0, 1]
    np.testing.assert_array_equal(again["f"], first["f"])
    monkeypatch.setattr(features, "computation_fingerprint", lambda lm: "the code after a model fix")
    assert features.extract_features(lm, TEXTS, ("f",), **options)["metadata"]["cache_dir"] != str(key_dir)


def test_bfloat16_forward_pass_is_close_and_cached_apart(lm, baseline, tmp_path):
    """``compute_dtype="bfloat16"``: the model (Φ included) runs in bf16, f(s) lands within a few % of
    float32's, and every kernel after it computes in float32; the two dtypes never share a cache entry."""
    bf16 = features.extract_features(lm, TEXTS, SMALL_KINDS, words=WORDS, prompt=PROMPT, batch_size=8,
                                     vocab_chunk=5000, compute_dtype="bfloat16", cache_dir=tmp_path, progress=False)
    f32 = features.extract_features(lm, TEXTS, ("f",), prompt=PROMPT, batch_size=8, cache_dir=tmp_path, progress=False)
    assert (bf16["metadata"]["cache_dir"] != f32["metadata"]["cache_dir"]
            and bf16["metadata"]["compute_dtype"] == "bfloat16")
    np.testing.assert_array_equal(f32["f"], baseline["f"])
    assert all(bf16[kind].dtype == np.float32 for kind in SMALL_KINDS)
    error = np.linalg.norm(bf16["f"] - baseline["f"]) / np.linalg.norm(baseline["f"])
    assert 1e-4 < error < 3e-2, error  # bf16 really ran (not a silent float32 pass), and stayed close
    phi_bf16 = jnp.asarray(lm.phi).astype(jnp.bfloat16).astype(jnp.float32)
    float32_kernel = kernels.conditional_mean_features(jnp.asarray(bf16["f"]), phi_bf16, 5000)
    np.testing.assert_allclose(bf16["phi_p_f"], np.asarray(float32_kernel), rtol=1e-5, atol=1e-6)


def test_bad_requests_are_clear_errors(lm, tmp_path):
    with pytest.raises(SentcompError, match="Unknown feature kinds"):
        features.extract_features(lm, TEXTS, ("f", "logits"))
    with pytest.raises(SentcompError, match="need a word list"):
        features.extract_features(lm, TEXTS, ("word_logits",))
    with pytest.raises(SentcompError, match="pass cache_dir"):
        features.extract_features(lm, TEXTS, ("p_f",))
    with pytest.raises(SentcompError, match=r"needs resolved extraction options .* pass options.resolved\(lm\)"):
        features.plan_extraction(lm, TEXTS, ("f",), None, None, features.ExtractionOptions())
    with pytest.raises(SentcompError, match=r"positions \[1\] are empty"):
        features.extract_features(lm, ["fine", ""], ("f",))
    with pytest.raises(SentcompError, match="truncation must be one of"):
        features.extract_features(lm, TEXTS, ("f",), truncation="middle")
    with pytest.raises(SentcompError, match="compute_dtype must be one of"):
        features.extract_features(lm, TEXTS, ("f",), compute_dtype="float16")
    with pytest.raises(SentcompError, match="no room left"):
        features.extract_features(lm, TEXTS, ("f",), prompt=" word" * 40)


def test_options_object_and_keywords_are_one_api(lm, baseline, tmp_path):
    """``options=ExtractionOptions(...)`` gives what the same settings as keywords give (the same arrays, the same
    cache entry); keywords replace the object's fields; an unknown name is one clear error."""
    options = features.ExtractionOptions(batch_size=8, vocab_chunk=5000, progress=False)
    by_object = features.extract_features(lm, TEXTS, SMALL_KINDS, words=WORDS, prompt=PROMPT, options=options)
    for kind in SMALL_KINDS:
        np.testing.assert_array_equal(by_object[kind], baseline[kind], err_msg=kind)
    assert by_object["metadata"] == baseline["metadata"]
    cached = features.extract_features(lm, TEXTS, ("f",), options=options, cache_dir=tmp_path)
    again = features.extract_features(lm, TEXTS, ("f",), batch_size=8, vocab_chunk=5000, progress=False,
                                      cache_dir=tmp_path)
    assert again["metadata"]["cache_dir"] == cached["metadata"]["cache_dir"]
    assert again["metadata"]["computed_chunks"] == []
    assert options.cache_dir is None  # replacing made a new object
    resolved = features.ExtractionOptions(max_length=10_000, batch_size=3).resolved(lm)
    assert resolved.max_length == lm.max_length and resolved.batch_size % resolved.mesh.size == 0
    assert resolved.buckets[-1] == lm.max_length
    with pytest.raises(SentcompError, match=r"unknown extraction option 'batchsize'; the known ones are max_length"):
        features.extract_features(lm, TEXTS, ("f",), batchsize=8)
    with pytest.raises(SentcompError, match="compute_dtype must be one of"):
        features.ExtractionOptions(compute_dtype="float16")


def padded_rows(maxima, lengths):
    """Σ over batches of the padded length each gets: the smallest of ``lengths`` that holds its longest row."""
    return sum(min(b for b in lengths if b >= m) for m in maxima)


@pytest.mark.parametrize("seed", range(6))
def test_fitted_buckets_pad_least_with_no_more_lengths_than_the_grid_uses(seed):
    """Against every subset of the batches' maxima (brute force): the fitted lengths hold every batch, are no more
    than the grid's lengths the batches use, and pad as little as the best such subset."""
    rng = np.random.default_rng(seed)
    maxima = [int(m) for m in rng.integers(3, 120, rng.integers(text.MIN_BATCHES_TO_FIT, 20))]
    grid = text.length_buckets(512)
    fitted = text.fitted_buckets(maxima, grid)
    allowed = len({min(b for b in grid if b >= m) for m in maxima})
    assert len(fitted) <= allowed and max(fitted) >= max(maxima)
    values = sorted(set(maxima))
    best = min(padded_rows(maxima, chosen) for k in range(1, allowed + 1)
               for chosen in itertools.combinations(values, k) if max(chosen) == values[-1])
    assert padded_rows(maxima, fitted) == best <= padded_rows(maxima, grid)


def test_few_batches_keep_the_grid_and_batch_maxima_are_make_batches_maxima():
    grid = text.length_buckets(64)
    assert text.fitted_buckets([33, 50], grid) == grid  # fewer than MIN_BATCHES_TO_FIT batches
    assert text.fitted_buckets([33, 50] * 4, grid) == (33, 50)  # the grid would pad them to 48 and 64
    lengths = [5, 17, 3, 9, 12, 1, 30]
    batches = text.make_batches([np.ones(n, np.int32) for n in lengths], 3, (32,), 0)
    longest = [int(batch.mask[:len(batch.indices)].sum(axis=1).max()) for batch in batches]
    assert text.batch_maxima(lengths, 3) == longest


def test_bucket_lengths_cap_at_max_length_and_always_end_there():
    assert text.bucket_lengths(64, (32, 8, 128)) == (8, 32, 64)
    assert text.bucket_lengths(64) == text.length_buckets(64) == (16, 24, 32, 48, 64)
