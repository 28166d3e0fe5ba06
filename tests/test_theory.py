"""Theory quantities against float64 references and cases with known answers."""

from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from sentcomp import probe, theory
from sentcomp.data import synthetic
from sentcomp.errors import SentcompError
from sentcomp.launcher.config_files import load_module


@pytest.fixture(scope="module")
def task():
    language = synthetic.make_language(1, vocab_size=24, num_states=4, body_length=6, label_signal=0.6)
    return language, synthetic.task_dataset(language, jax.random.key(0), 400)


def test_epsilon_of_true_model_is_zero_and_of_uniform_model_is_log_v_minus_entropy(task):
    language, data = task
    log_p_star = np.asarray(data.truth.log_next, np.float64)
    np.testing.assert_allclose(theory.kl_epsilon(data.truth.log_next, data.truth.log_next), 0.0, atol=1e-6)

    uniform = np.full(log_p_star.shape, -np.log(language.vocab_size))
    p_star = np.exp(log_p_star)
    entropy = -np.sum(p_star * np.maximum(log_p_star, -1e30), axis=-1)
    kl = np.asarray(theory.kl_epsilon(data.truth.log_next, uniform))
    np.testing.assert_allclose(kl, np.log(language.vocab_size) - entropy, rtol=1e-5, atol=1e-5)
    estimate = theory.mean_confidence_interval(kl.mean(axis=1))
    assert estimate.low < np.mean(np.log(language.vocab_size) - entropy) < estimate.high
    # A model giving zero probability to a possible word is infinitely far.
    assert np.isinf(theory.kl_epsilon(np.log([0.5, 0.5]), np.array([0.0, -np.inf])))


def test_confidence_interval_covers_the_mean_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = [
        (lambda e: e.low <= 1.0 <= e.high)(theory.mean_confidence_interval(rng.exponential(size=30)))
        for _ in range(2000)
    ]
    assert 0.92 < np.mean(covered) < 0.96  # t-interval on skewed data: close to, slightly under, 95%


def test_excess_quad_loss_matches_numerical_minimisation():
    rng = np.random.default_rng(1)
    vocab, dim = 30, 5
    phi = rng.normal(size=(vocab, dim))
    p_star = rng.dirichlet(np.ones(vocab), size=4)
    theta = rng.normal(size=(4, dim))

    def quad_loss(t, p):  # E_{w~p}[−θᵀφ_w + ½‖Φᵀθ‖²]
        return -(p @ phi) @ t + 0.5 * np.sum((phi @ t) ** 2)

    for n in range(4):
        best = scipy.optimize.minimize(quad_loss, np.zeros(dim), args=(p_star[n],), tol=1e-12).fun
        excess = theory.excess_quad_loss(theta[n].astype(np.float32), phi.astype(np.float32),
                                         p_star[n].astype(np.float32))
        np.testing.assert_allclose(excess, quad_loss(theta[n], p_star[n]) - best, rtol=1e-4, atol=1e-5)


def _noisy_one_hot_task(noise, n=1000):
    """p* puts all mass on word 0 or word 1; the label agrees with that word except for a `noise` fraction."""
    word = np.arange(n) % 2
    labels = word.copy()
    labels[: int(noise * n)] = 1 - labels[: int(noise * n)]
    p_star = np.zeros((n, 5))
    p_star[np.arange(n), word] = 1.0
    return p_star, labels


def test_tau_and_b_have_their_known_values():
    # Clean labels: the best ‖v‖_∞ ≤ B classifier puts ±B on the two words, τ(B) = log(1 + e^{−B}).
    p_star, labels = _noisy_one_hot_task(0.0)
    frontier = theory.naturalness_frontier(p_star, labels, max_norms=[0.5, 2.0, 8.0])
    np.testing.assert_allclose(frontier.train_loss, np.log1p(np.exp(-np.array([0.5, 2.0, 8.0]))), rtol=1e-6)
    np.testing.assert_allclose(frontier.word_weights[:, 1] - frontier.word_weights[:, 0], [1.0, 4.0, 16.0],
                               rtol=1e-5)
    # 10% label noise: the score of a context is v_word; the optimum v_1 = −v_0 = log 9 gives the binary entropy
    # of 0.1 once B ≥ log 9; below that the score is clipped at ±B.
    p_star, labels = _noisy_one_hot_task(0.1)
    frontier = theory.naturalness_frontier(p_star, labels, max_norms=[1.0, 4.0])
    entropy = -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))
    clipped = 0.9 * np.log1p(np.exp(-1.0)) + 0.1 * np.log1p(np.exp(1.0))  # scores ±1 with B = 1
    np.testing.assert_allclose(frontier.train_loss, [clipped, entropy], rtol=1e-6)
    value, k = theory.tightest_bound(frontier.train_loss, frontier.max_norm, epsilon=0.0, gamma=1.0)
    assert k == 1 and np.isclose(value, entropy)


def test_phi_frontier_is_a_valid_path():
    p_star, labels = _noisy_one_hot_task(0.1)
    phi = np.random.default_rng(2).normal(size=(5, 3))
    frontier = theory.phi_naturalness_frontier(p_star, labels, phi)
    # Less penalty: larger ‖v‖₂, lower τ; and every point's v really is Φᵀλ with the reported norms.
    assert np.all(np.diff(frontier.l2_norm) >= -1e-6) and np.all(np.diff(frontier.train_loss) <= 1e-9)
    np.testing.assert_allclose(frontier.word_weights, frontier.weights @ phi.T)
    np.testing.assert_allclose(frontier.train_loss[-1], -(0.1 * np.log(0.1) + 0.9 * np.log(0.9)), rtol=1e-3)
    with pytest.raises(SentcompError, match="binary"):
        theory.naturalness_frontier(p_star, labels + 1)


def test_bounds_formulas():
    assert np.isclose(theory.bound(0.3, 2.0, 0.01, 0.5), 0.3 + np.sqrt(2 * 4.0 * 0.01 / 0.5))
    assert np.isclose(theory.quad_bound(0.3, 3.0, 0.01, 0.5), 0.3 + 3.0 * np.sqrt(2 * 0.01 / 0.5))
    assert np.isclose(theory.coverage(np.log([0.1, 0.3]), np.log([0.2, 0.3])), 0.5)


def _model_near_truth(data, objective, noise, seed):
    """A model with Φ = I (d = V) whose f(s) is the objective's optimum plus Gaussian noise: log p* for
    cross-entropy (so p_f = p*), θ* = p* for Quad."""
    rng = np.random.default_rng(seed)
    log_p = np.asarray(data.truth.log_next, np.float64)
    optimum = np.maximum(log_p, -30.0) if objective == "xent" else np.exp(log_p)
    scale = noise if objective == "xent" else 0.2 * noise
    features = optimum + scale * rng.normal(size=log_p.shape)
    return features.astype(np.float32), np.eye(log_p.shape[-1], dtype=np.float32)


def _np_distances(data, features, objective):
    """Float64 numpy, at every context ``[N, T]`` (Φ = I): ``KL(p* ‖ softmax(f))`` for cross-entropy, the excess
    Quad loss ``½‖f − p*‖²`` (θ* = p* when Φ = I) for Quad."""
    log_p_star = np.asarray(data.truth.log_next, np.float64)
    p_star, theta = np.exp(log_p_star), features.astype(np.float64)
    if objective == "quad":
        return 0.5 * np.sum((theta - p_star) ** 2, axis=-1)
    p_f = np.exp(theta - scipy.special.logsumexp(theta, axis=-1, keepdims=True))
    return np.sum(scipy.special.rel_entr(p_star, p_f), axis=-1)  # p* log(p*/p_f), 0 where p* = 0


@pytest.mark.parametrize("objective", ["xent", "quad"])
@pytest.mark.slow
def test_evaluate_against_truth_holds_the_bound_and_improves_with_epsilon(task, objective):
    """The exact model (ε = 0) and a near-optimal one (ε > 0) whose tightest bound is well below log 2 at B > 0,
    where the theorem says something: the plug-in classifier's loss is under the bound there, and, from ε computed
    independently in float64, within the proof's ``|plug_in − τ| ≤ B·sqrt(2 ε_task)`` of τ (Pinsker + Jensen for
    cross-entropy, Cauchy-Schwarz with ‖v‖₂ for Quad) on the test documents."""
    language, data = task
    labels = np.asarray(data.labels)
    gamma = synthetic.task_coverage(language)
    results = {}
    for noise in (0.0, 0.01):
        features, phi = _model_near_truth(data, objective, noise, seed=3)
        results[noise] = theory.evaluate_against_truth(features, phi, data.truth.log_next, labels, gamma,
                                                       objective=objective)
    exact, near = results[0.0], results[0.01]
    distance = "epsilon" if objective == "xent" else "excess_quad"
    assert exact[distance]["mean"] < 1e-4 and 10 * max(exact[distance]["mean"], 0.0) < near[distance]["mean"] < 1e-3
    kinds = ("p_f", "phi_p_f") if objective == "xent" else ("f",)
    if objective == "xent":  # f's plug-in goes through a fitted A f + b: not a theorem, so only reported
        assert exact["features"]["f"]["affine_r2"] <= 1.0 and "plug_in" in exact["features"]["f"]
    distances = _np_distances(data, _model_near_truth(data, objective, 0.01, seed=3)[0], objective)
    assert near[distance]["mean"] == pytest.approx(distances.mean(), rel=1e-2)
    _, test = theory._train_test_split(len(labels), 0.5, 0)
    task_epsilon = distances[test, -1].mean()  # the theorem's step on the test documents, before coverage
    for kind in kinds:
        for result in results.values():
            entry = result["features"][kind]
            assert entry["plug_in"] <= entry["bound"] + 1e-6, (kind, entry)
        entry = near["features"][kind]
        assert entry["bound"] < np.log(2) - 0.1 and entry["norm"] > 0, (kind, entry)  # B > 0, bound < log 2
        assert abs(entry["plug_in"] - entry["tau"]) <= entry["norm"] * np.sqrt(2 * task_epsilon) + 1e-9, entry
        assert exact["features"][kind]["bound"] < entry["bound"]
    # The exact model's features carry p* itself: its probe does as well as the truth's.
    best = "p_f" if objective == "xent" else "f"
    assert abs(exact["features"][best]["probe"]["loss"] - exact["features"]["p_star"]["probe"]["loss"]) < 2e-3


def test_probes_can_choose_c_by_held_out_loss(task):
    """``probe_cv_metric="loss"``: the p* probe is sentcomp.probe's loss-tuned one on the same documents."""
    language, data = task
    labels = np.asarray(data.labels)
    features, phi = _model_near_truth(data, "xent", 0.0, seed=3)
    result = theory.evaluate_against_truth(features, phi, data.truth.log_next, labels,
                                           synthetic.task_coverage(language), probe_cv_metric="loss")
    train, test = theory._train_test_split(len(labels), 0.5, 0)
    p_star = np.exp(np.asarray(data.truth.log_next, np.float64)[:, -1])
    direct = probe.evaluate(p_star[train], labels[train], p_star[test], labels[test], cv_metric="loss")
    assert result["features"]["p_star"]["probe"]["C"] == direct.regularisation
    assert result["features"]["p_star"]["probe"]["loss"] == pytest.approx(direct.test_loss, rel=1e-4)


class _OracleModel:
    """Stands in for a LanguageModel: f(s) = log p*(.|s) (clipped), Φ = I, so p_f = p* at every context."""

    def __init__(self, language):
        self.language = language
        self.phi = np.eye(language.vocab_size, dtype=np.float32)

    def hidden(self, token_ids, attention_mask):
        assert token_ids.shape[1] == self.language.num_contexts and bool(np.all(attention_mask))
        return np.maximum(np.asarray(synthetic.exact_next_word(self.language, token_ids).log_next), -30.0)


def test_evaluate_model_on_task_reads_every_context(task):
    language, data = task
    results = theory.evaluate_model_on_task(_OracleModel(language), data, synthetic.task_coverage(language))
    assert results["epsilon"]["mean"] < 1e-4 and results["epsilon"]["n"] == len(data.labels)
    assert abs(results["features"]["p_f"]["plug_in"] - results["features"]["p_f"]["tau"]) < 1e-3


@pytest.mark.slow
def test_docs_mixture_table_script_follows_the_theory():
    """docs/scripts/theory_mixture.py (the table in docs/theory.md): the mixture model is exact at α = 0, ε
    shrinks with α, and the natural classifier's loss stays under the bound on every row."""
    script = load_module(Path(__file__).resolve().parent.parent / "docs" / "scripts" / "theory_mixture.py")
    with np.errstate(divide="ignore"):  # a word p* never emits: log 0 = −inf, as in the synthetic truth
        log_p_star = np.log(np.array([[0.7, 0.2, 0.1, 0.0]]))
    features, phi = script.mixture_model(log_p_star, 0.2)
    np.testing.assert_allclose(np.exp(features @ phi.T), [[0.61, 0.21, 0.13, 0.05]], rtol=1e-6)
    lines = script.table([0.5, 0.001], num_documents=200).splitlines()
    assert lines[2].startswith("| α | ε (p_L) |") and len(lines) == 6
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[4:]]
    epsilons = [float(row[1]) for row in rows]
    assert epsilons[0] > 100 * epsilons[1] > 0
    for row in rows:
        bound, plug_in = float(row[3].split()[0]), float(row[5])
        assert plug_in <= bound + 1e-6, row
