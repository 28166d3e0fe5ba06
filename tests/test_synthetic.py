"""The synthetic language: exact p* against brute-force enumeration, sampler against the model's probabilities."""

import itertools

import jax
import numpy as np
import pytest

from sentcomp import theory
from sentcomp.data import synthetic
from sentcomp.errors import SentcompError

TINY = dict(vocab_size=6, num_states=2, num_labels=2, body_length=3, answer_noise=0.2, label_signal=1.5)


def _document_probabilities(language) -> dict[tuple[int, ...], float]:
    """p(document) for every possible document, by summing the joint over y and every hidden path (float64)."""
    prior, initial, transition, emission, answer = (
        np.exp(np.asarray(a, np.float64))
        for a in (language.log_prior, language.log_initial, language.log_transition, language.log_emission,
                  language.log_answer)
    )
    length, states = language.body_length, language.num_states
    probabilities = {}
    for body in itertools.product(range(language.num_body_words), repeat=length):
        for label in range(language.num_labels):
            body_given_label = 0.0
            for path in itertools.product(range(states), repeat=length):
                p = initial[path[0]] * emission[label, path[0], body[0]]
                for t in range(1, length):
                    p *= transition[path[t - 1], path[t]] * emission[label, path[t], body[t]]
                body_given_label += p
            for word in range(language.vocab_size):
                if answer[label, word] > 0:
                    document = (*body, language.prompt_id, word)
                    probabilities[document] = probabilities.get(document, 0.0) + (
                        prior[label] * body_given_label * answer[label, word]
                    )
    return probabilities


def _brute_force_next_word(probabilities, prefix, vocab_size):
    total = sum(p for doc, p in probabilities.items() if doc[: len(prefix)] == prefix)
    next_word = np.zeros(vocab_size)
    for doc, p in probabilities.items():
        if doc[: len(prefix)] == prefix:
            next_word[doc[len(prefix)]] += p
    return total, next_word / total


@pytest.mark.slow
def test_exact_p_star_matches_brute_force_enumeration():
    language = synthetic.make_language(3, **TINY)
    probabilities = _document_probabilities(language)
    assert abs(sum(probabilities.values()) - 1.0) < 1e-6  # float32 parameters
    documents, _ = synthetic.sample_documents(language, jax.random.key(0), 6)
    truth = synthetic.exact_next_word(language, documents)
    assert truth.log_next.shape == (6, language.num_contexts, language.vocab_size)
    for n, document in enumerate(np.asarray(documents)):
        for t in range(1, language.num_contexts + 1):
            prefix_probability, next_word = _brute_force_next_word(probabilities, tuple(document[:t]),
                                                                   language.vocab_size)
            np.testing.assert_allclose(np.exp(truth.log_next[n, t - 1]), next_word, atol=2e-6)
            np.testing.assert_allclose(truth.log_prefix[n, t - 1], np.log(prefix_probability), rtol=1e-5)


def test_sampler_follows_the_model_distribution():
    language = synthetic.make_language(4, **TINY)
    probabilities = _document_probabilities(language)
    num_documents = 20_000
    documents, labels = synthetic.sample_documents(language, jax.random.key(1), num_documents)
    documents = np.asarray(documents)
    counts: dict[tuple[int, ...], int] = {}
    for document in map(tuple, documents):
        counts[document] = counts.get(document, 0) + 1
    assert set(counts) <= set(probabilities)
    total_variation = 0.5 * sum(abs(counts.get(doc, 0) / num_documents - p) for doc, p in probabilities.items())
    assert total_variation < 0.04  # ~54 outcomes, 20k draws: sampling noise alone gives ~0.02
    # The answer word agrees with the label with probability 1 − answer_noise.
    agreement = np.mean(documents[:, -1] == np.asarray(language.answer_ids)[np.asarray(labels)])
    assert abs(agreement - (1 - TINY["answer_noise"])) < 0.015
    assert np.all(documents[:, language.body_length] == language.prompt_id)


@pytest.mark.slow
def test_task_dataset_and_closed_form_coverage():
    language = synthetic.make_language(0, vocab_size=20, num_states=3, body_length=6)
    task = synthetic.task_dataset(language, jax.random.key(2), 64)
    assert task.contexts.shape == (64, 7) and task.log_p_star.shape == (64, 20)
    np.testing.assert_allclose(np.exp(task.log_p_star).sum(-1), 1.0, atol=1e-5)
    # p* after the prompt is supported on the answer words only and equals Σ_y p(y|s) q(.|y).
    answer_probs = np.exp(np.asarray(language.log_answer))[:, language.answer_ids]
    posterior = np.exp(np.asarray(task.truth.log_label_posterior[:, -1]))
    np.testing.assert_allclose(np.exp(task.log_p_star)[:, language.answer_ids], posterior @ answer_probs, atol=1e-5)


def test_coverage_closed_form_matches_sampled_frequencies():
    """γ = inf_s p_L(s)/p_T(s), estimated by counting: p_L from the contexts pretraining sees (every prefix of
    sampled documents, positions uniform), p_T from sampled task contexts; each ratio ≈ the closed form 1/(L+1)."""
    language = synthetic.make_language(1, vocab_size=6, num_states=2, body_length=2)  # 3 body words: 9 contexts
    length = language.body_length + 1
    documents, _ = synthetic.sample_documents(language, jax.random.key(3), 40_000)
    prefixes = [tuple(row) for row in np.asarray(documents)[:, :length]]  # pretraining contexts of that length
    task_contexts = [tuple(row) for row in np.asarray(synthetic.task_dataset(language, jax.random.key(4),
                                                                              40_000).contexts)]
    contexts = sorted(set(task_contexts))
    unique, counts = np.unique(np.asarray(prefixes), axis=0, return_counts=True)
    # each document gives L+1 pretraining contexts, one of each length: p_L(s) = #(prefix = s) / (N·(L+1))
    p_pretrain = {tuple(s): count / (len(prefixes) * language.num_contexts) for s, count in zip(unique, counts)}
    p_task = {s: task_contexts.count(s) / len(task_contexts) for s in contexts}
    ratios = np.array([p_pretrain[s] / p_task[s] for s in contexts if p_task[s] > 0.02])
    assert len(ratios) >= 6
    np.testing.assert_allclose(ratios, synthetic.task_coverage(language), rtol=0.12)  # ~1,000+ samples each
    gamma = theory.coverage(np.log([p_pretrain[s] for s in contexts]), np.log([p_task[s] for s in contexts]))
    assert 0.8 * synthetic.task_coverage(language) < gamma <= 1.05 * synthetic.task_coverage(language)


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(SentcompError, match="vocab_size"):
        synthetic.make_language(0, vocab_size=3, num_labels=2)
    with pytest.raises(SentcompError, match="answer_noise"):
        synthetic.make_language(0, answer_noise=1.0)
    language = synthetic.make_language(0, body_length=5)
    with pytest.raises(SentcompError, match="exact_next_word"):
        synthetic.exact_next_word(language, np.zeros((2, 3), np.int32))
