"""Zero-shot sentence completion against a brute-force float64 computation with the real GPT-2 tokenizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import parallel, zeroshot
from sentcomp.data import Split, get_task, task_from_config
from sentcomp.data.text import demonstration_prefix, encode_texts
from sentcomp.errors import SentcompError
from sentcomp.models import gpt2
from sentcomp.models.base import LanguageModel
from sentcomp.models.tokenizers import gpt2_tokenizer

DIM = 8
TEXTS = [
    "A gorgeous, witty, seductive movie.",
    "The plot is nowhere near as clever as it thinks it is, and the jokes land with a thud every single time.",
    "Dull.",
    "An uneven but often charming debut",
    "I laughed; I cried; I checked my watch.",
]
# Multi-token and several words per label; words sharing their first token exercise grouped rows.
TASK = task_from_config({
    "name": "toy_reviews",
    "label_names": ["negative", "positive"],
    "prompt": " This movie is ",
    "label_words": {"negative": ["terrible", "not worth it", "not good"], "positive": ["great", "a must see"]},
})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return gpt2_tokenizer(cache_dir=tmp_path_factory.mktemp("gpt2-tokenizer"))


def _np_features(emb, ids):
    """The toy model in float64: ``f_t = emb[x_t] + mean_{s≤t} emb[x_s]`` (causal, so context matters)."""
    vectors = emb[np.asarray(ids)]
    return vectors + np.cumsum(vectors, axis=0) / np.arange(1, len(ids) + 1)[:, None]


def _toy_hidden_fn(params, ids, mask):
    vectors = params["emb"][ids] * mask[..., None]
    counts = jnp.maximum(jnp.cumsum(mask, axis=1), 1)[..., None]
    return params["emb"][ids] + jnp.cumsum(vectors, axis=1) / counts


def _toy_lm(tokenizer, max_length):
    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    params = {"emb": rng.normal(size=(vocab, DIM)).astype(np.float32),
              "phi": rng.normal(size=(vocab, DIM)).astype(np.float32)}
    return LanguageModel("toy", "toy", None, params, _toy_hidden_fn, lambda p: p["phi"], tokenizer, max_length)


def _np_log_softmax(logits):
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _brute_force_word_scores(tokenizer, features_fn, phi, texts, task, max_length):
    """Each word's summed log-probability after ``text + prompt``, one unpadded sequence at a time, float64."""
    words, _ = zeroshot.label_word_list(task)
    context_suffix = task.prompt.rstrip()
    scores = np.zeros((len(texts), len(words)))
    for i, text in enumerate(texts):
        context = tokenizer.encode(text + context_suffix)
        conts = [tokenizer.encode(text + task.prompt + word)[len(context):] for word in words]
        kept = context[-(max_length - max(map(len, conts)) + 1):]  # the document loses its beginning
        for j, cont in enumerate(conts):
            sequence = kept + cont[:-1]  # the last token is only predicted
            log_p = _np_log_softmax(features_fn(sequence) @ phi.T)
            scores[i, j] = sum(log_p[len(kept) - 1 + t, token] for t, token in enumerate(cont))
    return scores


def _np_label_scores(word_scores, word_labels):
    return np.stack([np.log(np.exp(word_scores[:, word_labels == y]).sum(1)) for y in range(2)], axis=1)


def test_scores_match_float64_brute_force_with_truncation(tokenizer):
    max_length = 20  # below the model's 64: the second text is truncated
    lm = _toy_lm(tokenizer, 64)
    assert len(tokenizer.encode(TEXTS[1] + " This movie is")) > max_length
    emb, phi = (np.asarray(lm.params[k], np.float64) for k in ("emb", "phi"))
    expected = _brute_force_word_scores(tokenizer, lambda ids: _np_features(emb, ids), phi, TEXTS, TASK, max_length)
    result = zeroshot.zero_shot(lm, TASK, TEXTS, batch_size=8, max_length=max_length, chunk_size=8192,
                                progress=False)
    assert result.words == ("terrible", "not worth it", "not good", "great", "a must see")
    np.testing.assert_allclose(result.word_scores, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result.label_scores, _np_label_scores(expected, result.word_labels), atol=1e-4)
    np.testing.assert_array_equal(result.predictions, _np_label_scores(expected, result.word_labels).argmax(1))
    labels = np.array([1, 0, 0, 1, 0])
    assert result.accuracy(labels) == np.mean(result.predictions == labels)


def test_contextual_calibration_matches_float64_brute_force(tokenizer):
    lm = _toy_lm(tokenizer, 64)
    emb, phi = (np.asarray(lm.params[k], np.float64) for k in ("emb", "phi"))
    brute = functools.partial(_brute_force_word_scores, tokenizer, lambda ids: _np_features(emb, ids), phi,
                              task=TASK, max_length=20)
    words, word_labels = zeroshot.label_word_list(TASK)
    content_free = _np_label_scores(brute(list(zeroshot.CONTENT_FREE_TEXTS)), word_labels)
    normalised = np.exp(content_free) / np.exp(content_free).sum(1, keepdims=True)
    log_prior = np.log(normalised.mean(0))
    calibrated = _np_label_scores(brute(TEXTS), word_labels) - log_prior

    result = zeroshot.zero_shot(lm, TASK, TEXTS, rule="calibrated", batch_size=8, max_length=20, progress=False)
    np.testing.assert_allclose(result.log_prior, log_prior, atol=1e-4)
    np.testing.assert_allclose(result.label_scores, calibrated, atol=1e-4)
    np.testing.assert_array_equal(result.predictions, calibrated.argmax(1))


def test_results_do_not_depend_on_batch_size(tokenizer):
    lm = _toy_lm(tokenizer, 32)
    texts = TEXTS * 3
    reference = zeroshot.zero_shot(lm, TASK, texts, batch_size=8, progress=False)
    for batch_size, mesh in [(24, None), (3, parallel.data_mesh(jax.devices()[:1]))]:
        result = zeroshot.zero_shot(lm, TASK, texts, batch_size=batch_size, mesh=mesh, progress=False)
        np.testing.assert_allclose(result.word_scores, reference.word_scores, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(result.predictions, reference.predictions)


def test_scorer_compiles_once_per_length_bucket(tokenizer):
    lm = _toy_lm(tokenizer, 32)
    zeroshot.label_word_scores(lm, TASK, TEXTS, batch_size=8, chunk_size=4096, progress=False)
    zeroshot.label_word_scores(lm, TASK, TEXTS[::-1] * 2, batch_size=8, chunk_size=4096, progress=False)
    rows = zeroshot.build_rows(tokenizer, TEXTS, TASK.prompt, zeroshot.label_word_list(TASK)[0], 32)
    buckets = {16 if len(row.input_ids) <= 16 else 32 for row in rows}
    assert len(buckets) == 2
    assert zeroshot._jitted_scorer(lm.hidden_fn, lm.phi_fn, 4096)._cache_size() == len(buckets)


def test_rows_keep_the_prompt_and_share_forward_passes(tokenizer):
    words = ("great", "not worth it", "not good", ":)")
    rows = zeroshot.build_rows(tokenizer, TEXTS[1:2], " This movie is ", words, max_length=12)
    prompt_ids = tokenizer.encode(" This movie is")
    # "great" and ":)" are one token after the context: scored in the same pass; "not ..." share " not".
    assert sorted(row.words for row in rows) == [(0, 3), (1,), (2,)]
    for row in rows:
        context = row.input_ids[: row.start + 1]
        assert len(row.input_ids) <= 12 and list(context[-len(prompt_ids):]) == prompt_ids
        assert len(context) == 12 - 2  # room for the longest continuation ("not worth it": 3 tokens)


def test_raw_tokenizers_library_tokenizer_gives_the_same_rows(tokenizer):
    words = zeroshot.label_word_list(TASK)[0]
    with_transformers = zeroshot.build_rows(tokenizer, TEXTS, TASK.prompt, words, 20)
    with_tokenizers = zeroshot.build_rows(tokenizer.backend_tokenizer, TEXTS, TASK.prompt, words, 20)
    assert with_tokenizers == with_transformers


@pytest.mark.slow
def test_tiny_gpt2_matches_unpadded_single_sequences(tokenizer):
    """A real (random, tiny) GPT-2: padded, grouped, sharded scoring equals one-sequence-at-a-time log-probs."""
    config = gpt2.gpt2_config(n_embd=32, n_layer=2, n_head=2, n_positions=24)
    lm = gpt2.init(config, rng=1, tokenizer=tokenizer)
    task = "sst2"
    texts = TEXTS[:3]  # the reference compiles once per sequence length

    def features(ids):
        ids = jnp.asarray([ids], jnp.int32)
        return np.asarray(lm.hidden(ids, jnp.ones_like(ids)), np.float64)[0]

    phi = np.asarray(lm.phi, np.float64)
    expected = _brute_force_word_scores(tokenizer, features, phi, texts, get_task(task), config.n_positions)
    got = zeroshot.label_word_scores(lm, task, texts, batch_size=8, progress=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-4)


def test_errors_are_explained(tokenizer):
    lm = _toy_lm(tokenizer, 5)
    with pytest.raises(SentcompError, match="more than max_length 5"):
        zeroshot.zero_shot(lm, TASK, TEXTS[:1], progress=False)
    with pytest.raises(SentcompError, match="no texts"):
        zeroshot.zero_shot(_toy_lm(tokenizer, 32), TASK, [], progress=False)


def test_compute_dtype_and_truncation_reach_the_scorer(tokenizer):
    """bfloat16 really runs (scores move, a little) and truncation="end" keeps the text's first tokens."""
    config = gpt2.gpt2_config(n_embd=32, n_layer=2, n_head=2, n_positions=24)
    lm = gpt2.init(config, rng=1, tokenizer=tokenizer)
    full = zeroshot.label_word_scores(lm, "sst2", TEXTS[:3], batch_size=8, progress=False)
    half = zeroshot.label_word_scores(lm, "sst2", TEXTS[:3], batch_size=8, progress=False, compute_dtype="bfloat16")
    assert not np.array_equal(full, half)
    np.testing.assert_allclose(half, full, atol=0.1)
    words = zeroshot.label_word_list(get_task("sst2"))[0]
    long_text = " ".join(["a genuinely long review that keeps going"] * 6)
    for truncation in ("start", "end"):
        rows = zeroshot.build_rows(tokenizer, [long_text], " This movie is ", words, 20, truncation)
        longest = max(len(target) for row in rows for target in row.targets)
        context = encode_texts(tokenizer, [long_text], 20 - (longest - 1), " This movie is",
                                    truncation=truncation).token_ids[0]
        assert all(list(row.input_ids[: row.start + 1]) == list(context) for row in rows)
    with pytest.raises(SentcompError, match="compute_dtype must be one of"):
        zeroshot.label_word_scores(lm, "sst2", TEXTS[:1], compute_dtype="float16", progress=False)
    with pytest.raises(SentcompError, match="batch_size must be a positive"):
        zeroshot.label_word_scores(lm, "sst2", TEXTS[:1], batch_size=0, progress=False)


def test_prompt_sensitivity_plan_runs_from_the_library_alone(tokenizer):
    """sentcomp.zeroshot.ZeroShotPlan without any program: every template × verbalizer at k = 0 equals a float64
    brute force of that variant alone (accuracy and Brier score; the plan scores a template's verbalizers in one
    pass), the k-shot variant equals zero_shot after the plan's prefix (2 train demonstrations, never a test
    text), and the summary's prompt-sensitivity min / mean / max are those of the variants."""
    lm = _toy_lm(tokenizer, 64)
    emb, phi = (np.asarray(lm.params[k], np.float64) for k in ("emb", "phi"))
    labels = np.array([1, 0, 0, 1, 0])
    test = Split(TEXTS, labels)
    train = Split(["Loved it.", "Awful film.", "A joy.", "Boring and long.", "Superb acting.", "Not funny."],
                  np.array([1, 0, 1, 0, 1, 0]))
    plan = zeroshot.ZeroShotPlan.for_task(TASK, templates=(" This movie is ", " All in all it was "),
                                          verbalizers=("terrible;great", "not good,bad;a must see"), shots=(0, 2))
    assert [(v.k, v.t, v.v) for v in plan.variants()] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (2, 0, 0)]
    records = plan.run(lm, TASK, [(train, test)], batch_size=8, max_length=64, progress=False)
    assert [(r["k"], r["t"], r["v"], r["repeat"]) for r in records] == [
        (v.k, v.t, v.v, 0) for v in plan.variants()]
    for record in records:
        verbalizer = plan.verbalizers[record["v"]]
        if record["k"] == 0:
            variant_task = task_from_config({"name": "toy_variant", "label_names": list(TASK.label_names),
                                             "prompt": plan.templates[record["t"]],
                                             "label_words": {label: list(w) for label, w in verbalizer.items()}})
            _, word_labels = zeroshot.label_word_list(variant_task)
            label_scores = _np_label_scores(_brute_force_word_scores(
                tokenizer, lambda ids: _np_features(emb, ids), phi, TEXTS, variant_task, 64), word_labels)
            probabilities = np.exp(_np_log_softmax(label_scores))
            assert record["rules"]["ll"]["accuracy"] == np.mean(label_scores.argmax(1) == labels)
            assert record["rules"]["ll"]["brier"] == pytest.approx(
                np.mean(np.sum((probabilities - np.eye(2)[labels]) ** 2, axis=1)), abs=1e-5)
            continue
        shown = record["demonstrations"]
        assert len(shown) == 2 and not {train.texts[i] for i in shown} & set(TEXTS)
        prefix = demonstration_prefix([train.texts[i] for i in shown],
                                      [verbalizer[TASK.label_names[train.labels[i]]][0] for i in shown],
                                      plan.templates[0])
        assert record["prefix_chars"] == len(prefix) > 0
        expected = zeroshot.zero_shot(lm, TASK, TEXTS, prompt=plan.templates[0], label_words=verbalizer,
                                      prefix=prefix, batch_size=8, max_length=64, progress=False).evaluate(labels)
        for rule, values in expected.items():
            assert record["rules"][rule] == pytest.approx(values, abs=1e-6)
    summary = zeroshot.summarise_variants(records, plan.sensitivity_shots)
    assert {(e["k"], e["rule"]) for e in summary["rules"]} == {(k, rule) for k in (0, 2)
                                                               for rule in zeroshot.SCORING_RULES}
    ll = next(e for e in summary["sensitivity"] if e["rule"] == "ll")
    at_k0 = [r["rules"]["ll"]["accuracy"] for r in records if r["k"] == 0]
    assert len(ll["accuracies"]) == 4 and (ll["min"], ll["max"]) == (min(at_k0), max(at_k0))
    assert ll["mean"] == pytest.approx(np.mean(at_k0))
