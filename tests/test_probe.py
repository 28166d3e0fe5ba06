"""Linear probes against scikit-learn (logistic regression) and float64 numpy solves (ridge)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeClassifier
from sklearn.metrics import f1_score, log_loss
from sklearn.multiclass import OneVsRestClassifier

from sentcomp import kernels, probe
from sentcomp.errors import SentcompError
from sentcomp.results import statistics


def _problem(seed, n, dim, num_classes, noise=1.0):
    """Correlated, unevenly scaled features with a noisy linear teacher (not separable)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(5.0, 0.2, dim)[:, None]
    x = rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim) * 3
    logits = x @ rng.normal(size=(dim, num_classes)) / np.linalg.norm(mixing) * 4
    y = np.argmax(logits + noise * rng.gumbel(size=logits.shape), axis=1)
    return x.astype(np.float32), y


def _np_objective(x, y, c, coef, intercept, sigmoid):
    """sklearn's C Σ ℓ + ½‖W‖² in float64, on features x (K' = coef.shape[1] columns)."""
    z = x.astype(np.float64) @ coef + intercept
    if sigmoid:
        t = 2.0 * (y[:, None] == (np.arange(coef.shape[1]) if coef.shape[1] > 1 else 1)) - 1.0
        losses = np.logaddexp(0.0, -t * z).sum(axis=1)
    else:
        top = z.max(axis=1, keepdims=True)
        losses = top[:, 0] + np.log(np.exp(z - top).sum(axis=1)) - z[np.arange(len(y)), y]
    return c * losses.sum() + 0.5 * np.sum(coef**2)


def _sklearn_probe(x, y, c, multi_class):
    """The float64 sklearn optimum: lbfgs to tight tolerance (binary = one column; OvR = K binary fits)."""
    x = x.astype(np.float64)
    if multi_class == "ovr" and len(np.unique(y)) > 2:
        fits = [LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y == k) for k in np.unique(y)]
        return np.concatenate([f.coef_.T for f in fits], axis=1), np.concatenate([f.intercept_ for f in fits])
    fit = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
    return fit.coef_.T, fit.intercept_


C_GRID = np.array([0.003, 0.3, 30.0])


@pytest.mark.parametrize(
    "num_classes,multi_class,standardize,warm_start",
    [(2, "multinomial", False, True), (3, "multinomial", True, True), (3, "ovr", False, False)],
)
def test_logistic_grid_reaches_sklearn_optimum(num_classes, multi_class, standardize, warm_start):
    x, y = _problem(num_classes, 1240, 12, num_classes)
    x_train, y_train, x_test = x[:240], y[:240], x[240:]
    weights = np.ones((2, 240), np.float32)
    weights[0, :60] = 0.0  # split 0 drops a quarter of the rows
    fits = kernels.logistic_regression_grid(
        x_train, y_train, weights, C_GRID, num_classes=num_classes, multi_class=multi_class,
        standardize=standardize, warm_start=warm_start,
    )
    sigmoid = num_classes == 2 or multi_class == "ovr"
    for s in range(2):
        rows = weights[s] > 0
        mean, scale = x_train[rows].mean(0), (x_train[rows].std(0) if standardize else np.ones(12, np.float32))
        x_fit = (x_train[rows] - mean) / scale  # sklearn sees the standardised features when we standardise
        for l, c in enumerate(C_GRID):
            ref_coef, ref_intercept = _sklearn_probe(x_fit, y_train[rows], c, multi_class)
            coef = np.asarray(fits.coef[s, l], np.float64) * scale[:, None]  # back to standardised features
            intercept = np.asarray(fits.intercept[s, l], np.float64) + mean @ np.asarray(fits.coef[s, l], np.float64)
            ours = _np_objective(x_fit, y_train[rows], c, coef, intercept, sigmoid)
            ref = _np_objective(x_fit, y_train[rows], c, ref_coef, ref_intercept, sigmoid)
            assert abs(ours - ref) <= 1e-5 * abs(ref), (s, c, ours, ref)
            np.testing.assert_allclose(float(fits.objective[s, l]), ours, rtol=1e-4)
            if not standardize:  # the exported objective is sklearn's on raw features
                exported = kernels.logistic_objective(x_train, y_train, weights[s], c, fits.coef[s, l],
                                                      fits.intercept[s, l], num_classes, multi_class)
                np.testing.assert_allclose(float(exported), ours, rtol=1e-4)
            ours_scores = kernels.linear_scores(x_test, fits.coef[s, l], fits.intercept[s, l])
            ours_pred = np.asarray(kernels.predict_labels(ours_scores))
            ref_pred = np.argmax((x_test - mean) / scale @ ref_coef + ref_intercept, 1) if ref_coef.shape[1] > 1 else (
                ((x_test - mean) / scale @ ref_coef + ref_intercept)[:, 0] > 0)
            assert np.sum(ours_pred != ref_pred) <= 1, (s, c)  # ≤ 1 in 1000 held-out examples


def test_softmax_loss_keeps_its_precision_at_large_scores():
    """At scores ~10⁶ float32 ``logsumexp(z) − z_y`` loses the whole loss (and can go negative, which once let a
    line search 'decrease' the objective to nonsense); the loss must match float64 wherever the margins do."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 64)
    targets = np.eye(5, dtype=np.float32)[labels]
    for offset in (0.0, 1e3, 1e6):
        scores = (rng.normal(size=(64, 5)) * 2 + offset).astype(np.float32)
        shifted = scores.astype(np.float64) - scores[np.arange(64), labels][:, None]
        reference = np.log(np.exp(shifted).sum(axis=1))  # float64, from the same float32 scores
        losses = kernels.logistic_losses(jnp.asarray(scores), jnp.asarray(targets), sigmoid=False)
        np.testing.assert_allclose(np.asarray(losses), reference, rtol=1e-6, atol=1e-6, err_msg=str(offset))


def test_lbfgs_line_search_backs_off_from_non_finite_values():
    """A trial point where the objective overflows (NaN here) is a step too long, not the end of the search."""
    from sentcomp.kernels.lbfgs import lbfgs_minimise

    def fun(v):  # steep quadratic with its minimum at 3: the first unit step lands at 30, in the NaN region
        return 5.0 * jnp.sum(jnp.square(v - 3.0)) + jnp.where(jnp.max(jnp.abs(v)) > 10.0, jnp.nan, 0.0)

    params, value, grad_norm, iterations = lbfgs_minimise(fun, jnp.zeros(4), max_iter=50, tol=1e-4)
    np.testing.assert_allclose(np.asarray(params), 3.0, atol=1e-4)
    assert float(grad_norm) < 1e-4 and int(iterations) < 50


def _ridge_reference(x, targets, rows, alpha, standardize):
    """float64 ridge on the rows of one split: ``(coef, intercept, objective)`` on raw features."""
    x64 = x[rows].astype(np.float64)
    mean, scale = x64.mean(0), (x64.std(0) if standardize else np.ones(x.shape[1]))
    z, t = (x64 - mean) / scale, targets[rows] - targets[rows].mean(0)
    w_std = np.linalg.solve(z.T @ z + alpha * np.eye(x.shape[1]), z.T @ t)
    coef = w_std / scale[:, None]
    intercept = targets[rows].mean(0) - mean @ coef
    return coef, intercept, np.sum((targets[rows] - x64 @ coef - intercept) ** 2) + alpha * np.sum(w_std**2)


@pytest.mark.parametrize("method", ["pcg", "eigh"])
@pytest.mark.parametrize("standardize", [False, True])
def test_ridge_grid_matches_numpy_solve(standardize, method):
    x, y = _problem(7, 203, 9, 4)
    targets = np.eye(4, dtype=np.float32)[y]
    folds = probe.stratified_folds(y, 4, seed=1)
    alphas = np.array([1e-2, 1.0, 1e2, 1e4])
    weights = np.stack([folds != f for f in range(4)] + [np.ones(len(y), bool)]).astype(np.float32)
    by_weights = kernels.ridge_grid(
        kernels.ridge_moments(x, targets, weights), alphas, standardize=standardize, method=method
    )
    layout = probe.fold_layout(x, targets, folds, 4)
    by_folds = kernels.ridge_grid(kernels.kfold_ridge_moments(*layout), alphas, standardize=standardize, method=method)
    # numpy's syrk Gram matrices (evaluate's CPU path) combined by the same jitted split sums
    host_moments = kernels.kfold_split_moments(kernels.fold_moments(*layout, xp=np))
    by_host_folds = kernels.ridge_grid(host_moments, alphas, standardize=standardize, method=method)
    for s in range(5):
        rows = weights[s] > 0
        x64 = x[rows].astype(np.float64)
        scale = x64.std(0) if standardize else np.ones(9)
        for l, alpha in enumerate(alphas):
            _, _, objective = _ridge_reference(x, targets, rows, alpha, standardize)
            for fits in (by_weights, by_folds, by_host_folds):
                # float32 Gram + eigh: the objective is tight, ill-conditioned coefficient directions less so
                ours = np.asarray(fits.coef[s, l], np.float64)
                achieved = np.sum((targets[rows] - x64 @ ours - np.asarray(fits.intercept[s, l], np.float64)) ** 2)
                achieved += alpha * np.sum((ours * scale[:, None]) ** 2)
                assert abs(achieved - objective) <= 1e-5 * objective, (s, alpha, achieved, objective)
                np.testing.assert_allclose(fits.objective[s, l], objective, rtol=1e-4)
                assert float(fits.grad_norm[s, l]) <= 1e-5  # CG's relative residual; 0 for eigh


@pytest.mark.parametrize("standardize", [False, True])
def test_ridge_grid_dual_matches_numpy_solve(standardize):
    """Fewer rows than features (40 × 64): the kernel-matrix solve reaches the float64 optimum of every split × α,
    its objective and its predictions, on all rows' kernel matrix and on each split's own rows (``support``)."""
    x, y = _problem(5, 40, 64, 3)
    targets = np.eye(3, dtype=np.float32)[y]
    folds = probe.stratified_folds(y, 4, seed=2)
    weights = np.stack([folds != f for f in range(4)] + [np.ones(len(y), bool)]).astype(np.float32)
    alphas = np.array([1e-2, 1.0, 1e2, 1e4])
    support = tuple(np.flatnonzero(split) for split in weights)
    for dual in (kernels.ridge_grid_dual(x, targets, weights, alphas, standardize=standardize),
                 kernels.ridge_grid_dual(x, targets, weights, alphas, standardize=standardize, support=support)):
        for s in range(5):
            rows = weights[s] > 0
            scale = x[rows].astype(np.float64).std(0) if standardize else np.ones(64)
            # N < d: at small α the fit nearly interpolates; errors are measured against the targets' spread too
            spread = np.sum((targets[rows] - targets[rows].mean(0)) ** 2)
            for l, alpha in enumerate(alphas):
                coef, intercept, objective = _ridge_reference(x, targets, rows, alpha, standardize)
                ours, ours_intercept = np.asarray(dual.coef[s, l], np.float64), np.asarray(dual.intercept[s, l])
                achieved = np.sum((targets[rows] - x[rows] @ ours - ours_intercept) ** 2)
                achieved += alpha * np.sum((ours * scale[:, None]) ** 2)
                assert abs(achieved - objective) <= 1e-5 * objective + 1e-8 * spread, (s, alpha, achieved, objective)
                np.testing.assert_allclose(dual.objective[s, l], objective, rtol=1e-4, atol=1e-6 * spread)
                np.testing.assert_allclose(x @ ours + ours_intercept, x @ coef + intercept,
                                           atol=1e-3 * np.abs(x @ coef).max() + 1e-5)
        assert not np.any(np.asarray(dual.grad_norm)) and not np.any(np.asarray(dual.iterations))


def test_ridge_pcg_beats_float32_eigh_on_lm_like_features():
    """Anisotropic features (a few dimensions ~100× the rest): CG preconditioned by the refit's spectrum gets
    the coefficients to float64's within 1e-3, which per-split float32 eigh does not, in a handful of steps."""
    rng = np.random.default_rng(5)
    n, dim = 1200, 40
    x = rng.normal(size=(n, 8)) @ rng.normal(size=(8, dim)) + 0.3 * rng.normal(size=(n, dim))
    x[:, :2] = x[:, :2] * 100 + 300
    x = x.astype(np.float32)
    y = (x[:, 5] + rng.normal(size=n) > 0).astype(int)
    targets = probe.ridge_targets(y, 2)
    folds = probe.stratified_folds(y, 5, seed=0)
    moments = kernels.kfold_ridge_moments(*probe.fold_layout(x, targets, folds, 5))
    alphas = np.array([1e-3, 1.0, 1e3])
    pcg = kernels.ridge_grid(moments, alphas)
    eigh = kernels.ridge_grid(moments, alphas, method="eigh")
    assert int(np.max(pcg.iterations)) <= 15 and float(np.max(pcg.grad_norm)) <= 1e-5
    worst = {"pcg": 0.0, "eigh": 0.0}
    for s in range(6):
        rows = folds != s if s < 5 else np.ones(n, bool)
        coef, _, _ = _ridge_reference(x, targets, rows, alphas[0], False)
        for name, fits in (("pcg", pcg), ("eigh", eigh)):
            error = np.linalg.norm(np.asarray(fits.coef[s, 0], np.float64) - coef) / np.linalg.norm(coef)
            worst[name] = max(worst[name], error)
    assert worst["pcg"] <= 1e-3 < worst["eigh"], worst


def test_ridge_pcg_reports_an_unfinished_solve():
    x, y = _problem(3, 300, 12, 3)
    targets = np.eye(3, dtype=np.float32)[y]
    moments = kernels.kfold_ridge_moments(*probe.fold_layout(x, targets, probe.stratified_folds(y, 5), 5))
    fits = kernels.ridge_grid(moments, np.array([1e-3, 1.0]), max_iter=1)
    assert np.all(np.asarray(fits.iterations)[:5] == 1) and float(np.max(fits.grad_norm[:5])) > 1e-5
    with pytest.raises(ValueError, match="method must be one of"):
        kernels.ridge_grid(moments, np.array([1.0]), method="cholesky")


@pytest.fixture(scope="module")
def paper_data():
    x, y = _problem(11, 1300, 8, 2, noise=2.0)
    return x[:300], y[:300], x[300:], y[300:]


def test_paper_protocol_matches_logistic_regression_cv(paper_data):
    x_train, y_train, x_test, y_test = paper_data
    ours = probe.evaluate(x_train, y_train, x_test, y_test, protocol="paper")
    grid = probe.paper_c_grid(len(x_train))
    assert ours.grid == grid.tolist() and len(grid) == 10 and ours.cv_scores.shape == (10, 5)
    folds = ours.folds
    splits = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(5)]
    sk = LogisticRegressionCV(
        Cs=grid, cv=splits, tol=1e-10, max_iter=10_000, l1_ratios=(0.0,), scoring="accuracy",
        use_legacy_attributes=False,
    ).fit(x_train.astype(np.float64), y_train)
    sk_scores = sk.scores_[:, 0, :].T  # [C, fold]
    fold_size = np.bincount(folds).min()
    assert np.abs(ours.cv_scores - sk_scores).max() <= 1.0 / fold_size + 1e-9
    if np.sort(sk_scores.mean(1))[-1] - np.sort(sk_scores.mean(1))[-2] > 1.0 / len(x_train):  # no near-tie
        assert ours.regularisation == sk.C_
    assert abs(ours.test_accuracy - sk.score(x_test.astype(np.float64), y_test)) <= 1e-3 + 1e-9
    assert abs(ours.train_accuracy - sk.score(x_train.astype(np.float64), y_train)) <= 1.0 / len(x_train) + 1e-9
    assert ours.converged

    # the same run with string labels, then with labels {3, 7}: identical numbers, classes reported, and the
    # kernel is not compiled again (same shapes; labels, folds and grid values are traced, not static)
    compiled = kernels.logistic_regression_grid._cache_size()
    names = np.array(["negative", "positive"])
    as_strings = probe.evaluate(x_train, names[y_train], x_test, names[y_test], protocol="paper")
    as_offsets = probe.evaluate(x_train, 3 + 4 * y_train, x_test, 3 + 4 * y_test, protocol="paper")
    assert as_strings.classes == ["negative", "positive"] and as_offsets.classes == [3, 7]
    for other in (as_strings, as_offsets):
        np.testing.assert_array_equal(other.cv_scores, ours.cv_scores)
        assert other.test_accuracy == ours.test_accuracy

    # precomputed folds are used as given and give the same table
    given = probe.evaluate(x_train, y_train, x_test, y_test, protocol="paper", folds=folds)
    np.testing.assert_array_equal(given.cv_scores, ours.cv_scores)
    assert kernels.logistic_regression_grid._cache_size() == compiled


# The keys of the dict evaluate returned before it returned a ProbeResult (results files were written from it)
RESULT_KEYS = ["protocol", "multi_class", "classes", "regularisation_name", "grid", "regularisation", "best_index",
               "cv_metric", "cv_scores", "cv_mean", "folds", "test_accuracy", "test_macro_f1", "test_loss",
               "train_accuracy", "test_accuracy_per_regularisation", "experiment_test_accuracy",
               "experiment_test_macro_f1", "coef", "intercept", "objective", "iterations", "grad_norm", "solver",
               "converged", "cv_fits", "cv_not_converged"]


def test_result_to_json_is_the_old_dict_with_lists(paper_data):
    """``to_json()``: the old dict's keys in its order, every array as its nested list, plain Python numbers (so
    ``json.dumps`` takes it), and its numbers are sklearn's (the paper protocol's CV table and test accuracy;
    MTEB's per-experiment accuracies)."""
    x_train, y_train, x_test, y_test = paper_data
    for result in (probe.evaluate(x_train, y_train, x_test, y_test, protocol="paper"),
                   probe.evaluate(x_train, y_train, x_test, y_test, protocol="mteb", seed=5)):
        as_json = result.to_json()
        assert list(as_json) == RESULT_KEYS
        json.dumps(as_json)  # JSON-ready: no numpy value left
        for key in RESULT_KEYS:
            value = getattr(result, key)
            if isinstance(value, np.ndarray):  # (compared as JSON text: MTEB's cv_mean is NaN, never == itself)
                assert json.dumps(as_json[key]) == json.dumps(value.tolist()), key
            else:
                assert as_json[key] == value and type(as_json[key]) in (str, int, float, bool, list, type(None)), key
    paper, mteb = (probe.evaluate(x_train, y_train, x_test, y_test, protocol=p, seed=5).to_json()
                   for p in ("paper", "mteb"))
    folds = np.array(paper["folds"])
    splits = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(5)]
    sk = LogisticRegressionCV(Cs=paper["grid"], cv=splits, tol=1e-10, max_iter=10_000, l1_ratios=(0.0,),
                              scoring="accuracy", use_legacy_attributes=False).fit(x_train.astype(np.float64), y_train)
    assert np.abs(np.array(paper["cv_scores"]) - sk.scores_[:, 0, :].T).max() <= 1.0 / np.bincount(folds).min() + 1e-9
    assert abs(paper["test_accuracy"] - sk.score(x_test.astype(np.float64), y_test)) <= 1e-3 + 1e-9
    accuracies = [LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x_train[s].astype(np.float64), y_train[s])
                  .score(x_test.astype(np.float64), y_test) for s in probe.undersample(y_train, 8, 10, seed=5)]
    np.testing.assert_allclose(mteb["experiment_test_accuracy"], accuracies, atol=2 / len(y_test))


def test_options_object_and_keywords_are_one_api(paper_data):
    """``options=ProbeOptions(...)`` and the same settings as keywords fit the same probe; keywords replace the
    object's fields; a program's probe config (with keys of its own) builds the options."""
    x_train, y_train, x_test, y_test = paper_data
    options = probe.ProbeOptions(protocol="paper", grid=[0.1, 1.0], n_folds=3, seed=2)
    by_object = probe.evaluate(x_train, y_train, x_test, y_test, options=options).to_json()
    by_keywords = probe.evaluate(x_train, y_train, x_test, y_test, "paper", grid=[0.1, 1.0], n_folds=3, seed=2)
    assert json.dumps(by_object) == json.dumps(by_keywords.to_json())
    replaced = probe.evaluate(x_train, y_train, x_test, y_test, options=options, seed=3)
    assert replaced.folds.tolist() == probe.stratified_folds(y_train, 3, seed=3).tolist() != by_object["folds"]
    config = {"protocol": "mteb", "standardize": True, "samples_per_label": 0, "every": 40, "task": "sst2"}
    built = probe.ProbeOptions.from_config(config, samples_per_label=None)
    assert (built.protocol, built.standardize, built.samples_per_label, built.n_folds) == ("mteb", True, None, None)


def test_unknown_or_bad_options_are_one_clear_error(paper_data):
    x_train, y_train, x_test, y_test = paper_data
    with pytest.raises(SentcompError, match=r"unknown probe option 'n_fold'; the known ones are protocol, "
                                            r"multi_class, n_folds"):
        probe.evaluate(x_train, y_train, x_test, y_test, n_fold=3)
    with pytest.raises(SentcompError, match=r"unknown probe options 'folds_count', 'regularization'"):
        probe.ProbeOptions().replace(regularization=1.0, folds_count=3)
    for bad, message in (({"protocol": "svm"}, "unknown probe protocol"), ({"max_iter": 0}, "max_iter"),
                         ({"protocol": "mteb", "multi_class": "ovr"}, "MTEB's multinomial"),
                         ({"protocol": "ridge", "penalize_intercept": True}, "liblinear")):
        with pytest.raises(SentcompError, match=message):  # when the options are built, before any data
            probe.ProbeOptions(**bad)


def test_converged_means_the_tolerance_was_reached(paper_data):
    """L-BFGS also stops where float32 cannot lower the objective any more; a tolerance below that floor, or
    too few iterations, must not be reported as converged."""
    x_train, y_train, x_test, y_test = paper_data
    unreachable = probe.evaluate(x_train, y_train, x_test, y_test, grid=[1.0], tol=1e-9, max_iter=300)
    assert unreachable.iterations < 300 and unreachable.grad_norm > 1e-8 and not unreachable.converged
    cut_short = probe.evaluate(x_train, y_train, x_test, y_test, grid=[1.0], max_iter=2)
    assert cut_short.iterations == 2 and not cut_short.converged
    reached = probe.evaluate(x_train, y_train, x_test, y_test, grid=[1.0])
    assert reached.converged and reached.grad_norm <= probe.LBFGS_CONVERGED_GRAD_FACTOR * 1e-4


def test_cross_validation_fits_report_their_convergence(paper_data):
    """``converged`` is the final refit's; ``cv_not_converged`` counts the fits that chose C and fell short."""
    x_train, y_train, x_test, y_test = paper_data
    cut_short = probe.evaluate(x_train, y_train, x_test, y_test, grid=[0.1, 1.0], n_folds=3, max_iter=2)
    assert cut_short.cv_fits == 3 * 2 and cut_short.cv_not_converged == 6
    reached = probe.evaluate(x_train, y_train, x_test, y_test, grid=[0.1, 1.0], n_folds=3)
    assert reached.cv_fits == 6 and reached.cv_not_converged == 0
    assert probe.evaluate(x_train, y_train, x_test, y_test, protocol="mteb").cv_fits == 0  # no search


def test_senteval_mteb_and_ridge_protocols(paper_data):
    x_train, y_train, x_test, y_test = paper_data
    x_dev, y_dev = x_test[:200], y_test[:200]
    senteval = probe.evaluate(x_train, y_train, x_test, y_test, protocol="senteval", x_dev=x_dev, y_dev=y_dev)
    assert senteval.grid == (2.0 ** np.arange(-2, 4)).tolist() and senteval.cv_scores.shape == (6, 1)
    dev_scores = [LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x_train.astype(np.float64), y_train)
                  .score(x_dev.astype(np.float64), y_dev) for c in senteval.grid]
    assert np.abs(senteval.cv_scores[:, 0] - dev_scores).max() <= 1.0 / len(y_dev) + 1e-9

    mteb = probe.evaluate(x_train, y_train, x_test, y_test, protocol="mteb", samples_per_label=None)  # all of train
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x_train.astype(np.float64), y_train)
    assert mteb.regularisation == 1.0 and mteb.cv_scores.shape == (1, 0)
    assert abs(mteb.test_accuracy - reference.score(x_test.astype(np.float64), y_test)) <= 1e-3 + 1e-9



@pytest.mark.parametrize(
    ("n_train", "dim", "num_classes", "method"),
    [(300, 8, 2, "pcg"), (400, 6, 4, "pcg"), (60, 40, 3, "eigh"), (50, 80, 3, "dual"), (40, 120, 2, "dual")],
)
def test_ridge_protocol_matches_ridge_classifier(n_train, dim, num_classes, method):
    """Every CV cell and the final test accuracy equal sklearn ``RidgeClassifier``'s on the same folds, through
    preconditioned CG (splits with ≥ 2 rows per feature), per-split ``eigh`` (fewer rows) and the N × N
    kernel matrix (fewer rows than features)."""
    x, y = _problem(num_classes, n_train + 500, dim, num_classes, noise=2.0)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    ridge = probe.evaluate(x_train, y_train, x_test, y_test, protocol="ridge")
    assert ridge.converged and ridge.solver == method
    folds, alpha = ridge.folds, ridge.regularisation
    x64 = x_train.astype(np.float64)
    for f in range(5):  # each CV cell is sklearn's RidgeClassifier, scored on the held-out fold
        train, held = folds != f, folds == f
        for l in (0, 3, 6, 9):
            sk = RidgeClassifier(alpha=ridge.grid[l]).fit(x64[train], y_train[train])
            assert ridge.cv_scores[l, f] == pytest.approx(sk.score(x64[held], y_train[held]), abs=1.01 / held.sum())
    assert alpha == ridge.grid[int(np.argmax(ridge.cv_scores.mean(1)))]
    final = RidgeClassifier(alpha=alpha).fit(x64, y_train)
    final_accuracy = final.score(x_test.astype(np.float64), y_test)
    assert ridge.test_accuracy == pytest.approx(final_accuracy, abs=1.01 / len(y_test))


def test_cv_metric_loss_selects_by_held_out_loss(paper_data):
    """``cv_metric="loss"``: each CV cell is the held-out log loss of sklearn's fit at that C (ridge: the mean
    squared error to RidgeClassifier's ±1 targets), the choice is the lowest mean, ``test_loss`` is the final
    probe's."""
    x_train, y_train, x_test, y_test = (np.asarray(a, np.float64) if a.dtype.kind == "f" else a for a in paper_data)
    ours = probe.evaluate(x_train, y_train, x_test, y_test, protocol="paper", cv_metric="loss")
    folds = ours.folds
    for l in (2, 5, 8):
        for f in (0, 3):
            train, held = folds != f, folds == f
            sk = LogisticRegression(C=ours.grid[l], tol=1e-10, max_iter=10_000).fit(x_train[train], y_train[train])
            held_loss = log_loss(y_train[held], sk.predict_proba(x_train[held]))
            assert ours.cv_scores[l, f] == pytest.approx(held_loss, rel=1e-3)
    assert ours.cv_metric == "loss" and ours.best_index == int(np.argmin(ours.cv_scores.mean(1)))
    final = LogisticRegression(C=ours.regularisation, tol=1e-10, max_iter=10_000).fit(x_train, y_train)
    assert ours.test_loss == pytest.approx(log_loss(y_test, final.predict_proba(x_test)), rel=1e-3)

    ridge = probe.evaluate(x_train, y_train, x_test, y_test, protocol="ridge", cv_metric="loss")
    for l in (0, 6):
        train, held = ridge.folds != 1, ridge.folds == 1
        sk = RidgeClassifier(alpha=ridge.grid[l]).fit(x_train[train], y_train[train])
        expected = np.mean(np.square(2.0 * y_train[held] - 1.0 - sk.decision_function(x_train[held])))
        # α = 10⁻³ on features whose covariance has condition number ~3·10⁸ (beyond float32's 1/ε): the
        # coefficients depend on the Gram matrix's rounding, the held-out error only to ~2·10⁻⁴
        assert ridge.cv_scores[l, 1] == pytest.approx(expected, rel=1e-3 if l == 0 else 1e-4)
    assert ridge.best_index == int(np.argmin(ridge.cv_scores.mean(1)))


def test_stratified_folds_are_balanced_and_seeded():
    labels = np.repeat([0, 1, 2], [50, 31, 7])
    folds = probe.stratified_folds(labels, 5, seed=3)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_class = np.bincount(folds[labels == c], minlength=5)
        assert per_class.max() - per_class.min() <= 1
    np.testing.assert_array_equal(folds, probe.stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, probe.stratified_folds(labels, 5, seed=4))


def test_undersample_draws_seeded_subsets_of_each_label():
    labels = np.repeat([0, 1, 2], [30, 20, 5])
    subsets = probe.undersample(labels, 8, 10, seed=3)
    assert len(subsets) == 10
    for subset in subsets:
        assert np.bincount(labels[subset]).tolist() == [8, 8, 5]  # every row of a label with fewer
        assert len(np.unique(subset)) == len(subset)
    assert len({tuple(subset) for subset in subsets}) == 10  # a new draw per experiment
    np.testing.assert_array_equal(np.concatenate(subsets), np.concatenate(probe.undersample(labels, 8, 10, seed=3)))
    assert not np.array_equal(subsets[0], probe.undersample(labels, 8, 10, seed=4)[0])


def _mteb_subsets(labels, samples_per_label, n_experiments, seed):
    """MTEB's ``AbsTaskClassification._undersample_data`` loop, restated on Python lists (the reference): one
    index list, re-shuffled in place by a fresh ``RandomState(seed)`` per experiment, first k of each label."""
    idxs, subsets = list(range(len(labels))), []
    for _ in range(n_experiments):
        np.random.RandomState(seed).shuffle(idxs)
        counts, chosen = {}, []
        for i in idxs:
            if counts.get(labels[i], 0) < samples_per_label:
                chosen.append(i)
                counts[labels[i]] = counts.get(labels[i], 0) + 1
        subsets.append(sorted(chosen))
    return subsets


def test_undersample_draws_mtebs_subsets():
    labels = np.random.default_rng(1).integers(0, 4, 300)
    ours = probe.undersample(labels, 8, 10, seed=42)
    assert [subset.tolist() for subset in ours] == _mteb_subsets(labels.tolist(), 8, 10, seed=42)


def test_mteb_protocol_is_multinomial_only():
    x, y = _problem(3, 200, 4, 3)
    with pytest.raises(SentcompError, match="MTEB's multinomial LogisticRegression"):
        probe.evaluate(x[:100], y[:100], x[100:], y[100:], protocol="mteb", multi_class="ovr")


def test_mteb_protocol_matches_sklearn_on_the_same_subsets():
    """MTEB: 10 experiments of C = 1 logistic regression on 8 examples per label; mean accuracy and macro-F1."""
    x, y = _problem(7, 900, 6, 3, noise=1.0)
    x_train, y_train, x_test, y_test = x[:400], y[:400], x[400:], y[400:]
    ours = probe.evaluate(x_train, y_train, x_test, y_test, protocol="mteb", seed=5)
    accuracies, f1s = [], []
    for subset in probe.undersample(y_train, 8, 10, seed=5):
        reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x_train[subset].astype(np.float64),
                                                                               y_train[subset])
        predictions = reference.predict(x_test.astype(np.float64))
        accuracies.append(np.mean(predictions == y_test))
        f1s.append(f1_score(y_test, predictions, average="macro"))
    assert ours.regularisation == 1.0 and ours.cv_fits == 0 and ours.converged
    np.testing.assert_allclose(ours.experiment_test_accuracy, accuracies, atol=2 / len(y_test))
    np.testing.assert_allclose(ours.experiment_test_macro_f1, f1s, atol=4 / len(y_test))
    assert abs(ours.test_accuracy - np.mean(accuracies)) <= 1 / len(y_test)
    assert abs(ours.test_macro_f1 - np.mean(f1s)) <= 2 / len(y_test)
    assert ours.coef.shape[0] == 10 and ours.train_accuracy > 0.5
    assert np.std(accuracies) > 0  # the experiments differ: the mean is over real repeats


def test_macro_f1_matches_sklearn_for_every_protocol(paper_data):
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 4, 50), rng.integers(1, 5, 50)  # class 0 never predicted, 4 never true
    assert statistics.macro_f1(labels, predictions) == pytest.approx(f1_score(labels, predictions, average="macro"))
    x_train, y_train, x_test, y_test = paper_data
    for protocol in probe.PROTOCOLS:  # one C (α) and two folds: the metric, not the search, is under test
        folds = {} if protocol == "mteb" else {"n_folds": 2}
        result = probe.evaluate(x_train, y_train, x_test, y_test, protocol=protocol, grid=[1.0], **folds,
                                samples_per_label=None)
        scores = x_test @ result.coef + result.intercept
        predictions = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(axis=1)
        assert np.mean(predictions == y_test) == pytest.approx(result.test_accuracy, abs=1e-6)  # float32 sum
        assert result.test_macro_f1 == pytest.approx(f1_score(y_test, predictions, average="macro"), abs=1e-9)


def test_bad_inputs_raise_one_clear_error():
    x, y = _problem(5, 40, 3, 2)
    cases = [
        (dict(y_train=np.zeros(40, int)), "single class"),
        (dict(x_train=np.where(np.arange(40)[:, None] == 3, np.nan, x)), "NaN/inf"),
        (dict(x_test=np.full((5, 3), np.inf)), "NaN/inf"),
        (
            dict(x_train=np.where(np.arange(40)[:, None] == 7, [[np.inf, -np.inf, 0.0]], x)),
            "2 NaN/inf values in 1 rows",
        ),
        (dict(y_train=y[:39]), "one label per feature row"),
        (dict(x_test=x[:, :2]), "features"),
        (dict(y_test=y + 5), "never seen"),
        (dict(y_test=np.array(["a"] * 40)), "encoding"),
        (dict(protocol="svm"), "unknown probe protocol"),
        (dict(folds=np.zeros(40, int)), "folds"),
        (dict(grid=[1.0, -1.0]), "positive"),
        (dict(multi_class="auto"), "multi_class"),
        (dict(cv_metric="f1"), "cv_metric must be one of"),
        (dict(protocol="mteb", grid=[0.5, 1.0]), "one grid value"),
        (dict(protocol="mteb", samples_per_label=0), "positive integers"),
    ]
    for change, message in cases:
        args = dict(x_train=x, y_train=y, x_test=x, y_test=y) | change
        with pytest.raises(SentcompError, match=message):
            probe.evaluate(**args)
    huge = np.float32(3e38) * np.sign(x)  # finite values whose sum overflows float32 are no false alarm
    np.testing.assert_array_equal(probe._features(huge, "x_train"), huge)


def test_row_space_memory_is_refused_with_the_figure():
    n = 10_000
    assert probe.row_space_peak_bytes(n, 50_257) == 8 * (5 * n * n + n * 8192)
    assert probe.row_space_peak_bytes(n, 100) == 8 * (5 * n * n + n * 100)
    with pytest.raises(SentcompError, match=r"10,000 × 10,000 float64 kernel.*about 4\.7 GB at peak \(the Gram alone "
                                            r"0\.8 GB\), more than the 1\.0 GB allowed"):
        probe.check_row_space_fits(n, 50_257, limit_bytes=10**9)
    probe.check_row_space_fits(100, 50_257, limit_bytes=10**9)  # fits: no error
    assert probe.available_memory_bytes() > 0


def test_penalized_intercept_is_liblinears(paper_data):
    """penalize_intercept=True solves liblinear's problem C Σ ℓ + ½(‖w‖² + b²) (sklearn solver='liblinear',
    intercept_scaling=1): binary, and one-vs-rest on three classes."""
    x_train, y_train, x_test, y_test = paper_data
    x_train = x_train + 4.0  # an offset, so the intercept is large and its penalty matters
    ours = probe.evaluate(x_train, y_train, x_test + 4.0, y_test, grid=[0.05], penalize_intercept=True, tol=1e-6)
    reference = LogisticRegression(solver="liblinear", C=0.05, tol=1e-12, max_iter=100_000).fit(
        x_train.astype(np.float64), y_train)
    np.testing.assert_allclose(ours.coef[:, 0], reference.coef_[0], rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(ours.intercept, reference.intercept_, rtol=2e-3, atol=2e-4)
    free = probe.evaluate(x_train, y_train, x_test + 4.0, y_test, grid=[0.05], tol=1e-6)
    assert abs(free.intercept[0] - ours.intercept[0]) > 0.05  # the option changes the probe

    x, y = _problem(5, 500, 5, 3)
    x = x + 3.0
    ours = probe.evaluate(x[:300], y[:300], x[300:], y[300:], grid=[0.1], multi_class="ovr",
                          penalize_intercept=True, tol=1e-6)
    reference = OneVsRestClassifier(LogisticRegression(solver="liblinear", C=0.1, tol=1e-12, max_iter=100_000))
    reference.fit(x[:300].astype(np.float64), y[:300])
    np.testing.assert_allclose(ours.coef.T, np.stack([e.coef_[0] for e in reference.estimators_]),
                               rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(ours.intercept, [e.intercept_[0] for e in reference.estimators_],
                               rtol=2e-3, atol=2e-4)
    with pytest.raises(SentcompError, match="penalize_intercept=True is liblinear's"):
        probe.evaluate(x[:300], y[:300], x[300:], y[300:], penalize_intercept=True, standardize=True)


def test_unshuffled_folds_are_logistic_regression_cvs_default(paper_data):
    """shuffle_folds=False: the cross-validation scores of sklearn's LogisticRegressionCV(cv=5), no folds given."""
    x_train, y_train, x_test, y_test = paper_data
    grid = [0.01, 0.1, 1.0]
    ours = probe.evaluate(x_train, y_train, x_test, y_test, grid=grid, shuffle_folds=False, tol=1e-6)
    reference = LogisticRegressionCV(Cs=grid, cv=5, tol=1e-10, max_iter=10_000).fit(x_train.astype(np.float64),
                                                                                   y_train)
    fold_size = len(y_train) / 5
    np.testing.assert_allclose(ours.cv_scores, reference.scores_[1].T, atol=1 / fold_size + 1e-9)
    assert ours.regularisation == reference.C_[0]
    assert not np.array_equal(ours.folds, probe.evaluate(x_train, y_train, x_test, y_test, grid=grid).folds)
