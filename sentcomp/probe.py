"""Linear-probe evaluation of frozen features: one call, one protocol, every number a table needs.

    from sentcomp import probe
    result = probe.evaluate(x_train, y_train, x_test, y_test, protocol="paper")  # a ProbeResult
    result.test_accuracy, result.test_macro_f1, result.regularisation, result.cv_scores  # [grid, fold]
    result.to_json()  # every field, JSON-ready

    options = probe.ProbeOptions(protocol="paper", multi_class="ovr")  # checked here, before any data
    probe.evaluate(x_train, y_train, x_test, y_test, options=options, seed=3)  # keywords replace fields

Protocols (the kernels and their conventions: :mod:`sentcomp.kernels.logistic`, :mod:`sentcomp.kernels.ridge`):

* ``"paper"`` — the authors' recipe (../shared/PAPER.md): L2 logistic regression with intercept, C chosen by
  5-fold stratified cross-validation on train (mean held-out accuracy, first best on ties, i.e. the
  strongest regularisation), ``C ∈ {10⁻⁶, …, 10³}`` when N < 10,000 else ``{10⁻³, …, 10²}``, no feature
  scaling, then a refit on all of train. sklearn's ``C``: ``C Σ_i ℓ_i + ½‖W‖²``, i.e. ``λ = 1/(N·C)`` per
  mean loss. Multinomial by default; the authors used one-vs-rest (multinomial only on SST-5 subset-word
  features): pass ``multi_class="ovr"`` to reproduce that (one C for all classes, chosen by the accuracy of
  the combined argmax classifier, where sklearn's old OvR ``LogisticRegressionCV`` chose one C per class).
* ``"senteval"`` — SentEval's logistic-regression probe: ``C ∈ {2⁻², …, 2³}`` chosen on the dev set
  (``x_dev, y_dev``) with the final probe trained on train only; without a dev set, by k-fold CV on train
  and a refit.
* ``"mteb"`` — MTEB's classification protocol (``AbsTaskClassification`` with its logistic-regression evaluator):
  ``n_experiments`` (10) experiments, each trained on ``samples_per_label`` (8) training examples per label —
  the first of each label in a seeded random order of train, re-shuffled per experiment as MTEB does
  (:func:`undersample`), all of a label with fewer — by multinomial L2 logistic regression with C = 1 and no
  search (MTEB's ``LogisticRegression(max_iter=100)``, sklearn's multinomial lbfgs), scored on all of test;
  accuracy and macro-F1 are the means over the experiments. ``samples_per_label=None`` trains one probe on
  all of train instead. MTEB's probe is multinomial, so this protocol refuses ``multi_class="ovr"``.
* ``"ridge"`` — ridge regression onto sklearn ``RidgeClassifier``'s targets (one ±1 column for two classes,
  one-hot otherwise; ``Σ‖y − xᵀW − b‖² + α‖W‖²``), ``α ∈ {10⁻³, …, 10⁶}`` chosen like ``"senteval"`` (dev
  set if given, else k-fold CV and a refit).

Every protocol also reports the test set's macro-F1 (sklearn's ``f1_score(average="macro")``: the unweighted
mean of the per-class F1 over the classes in the test labels or the predictions).

Labels may be any sortable values (strings, or integers not in ``0..K−1``); they are mapped to the sorted
unique training labels, reported as ``result.classes``. Folds are stratified and seeded (``seed``), or
given as ``folds`` (one fold index per training example).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentcomp import kernels
from sentcomp.errors import SentcompError, replace_settings
from sentcomp.results import statistics

PROTOCOLS = ("paper", "senteval", "mteb", "ridge")
PAPER_LARGE_N = 10_000
RIDGE_TOL = 1e-4  # relative preconditioned residual of the ridge CG solves (float32 Grams carry ~1e-7·κ anyway)
RIDGE_PCG_MIN_ROWS_PER_FEATURE = 2
# L-BFGS also stops when no step lowers the float32 objective any more; near the optimum that happens with the
# gradient within a few × tol (≤ 6× measured on the benchmark's features), far from it it signals a failure.
LBFGS_CONVERGED_GRAD_FACTOR = 10.0
CV_METRICS = ("accuracy", "loss")
MTEB_N_EXPERIMENTS = 10  # MTEB's AbsTaskClassification defaults
MTEB_SAMPLES_PER_LABEL = 8


def row_space_features(x, column_chunk: int = 8192) -> np.ndarray:
    """Lossless ``[N, r]`` coordinates of ``N`` feature vectors ``x [N, D]`` with ``D > N`` (e.g. the full
    next-word distribution ``p_f(s)``, ``D = V``), for every probe here, from the ``N × N`` kernel matrix.

    With ``K = X Xᵀ = U Λ Uᵀ`` (float64, accumulated over ``column_chunk`` columns at a time, so ``x`` may be a
    memory-mapped file never read whole), ``Z = U Λ^½`` over the ``r`` eigenvalues above ``10⁻¹²·λ_max``
    satisfies ``Z Zᵀ = K``: ``Z`` is ``X`` written in an orthonormal basis of its row space, ``X = Z Qᵀ`` with
    ``QᵀQ = I``. An L2-penalised linear probe (logistic or ridge, with intercept, no feature standardisation)
    fitted on any subset of the rows has its optimal ``w`` in that row space (the representer theorem), and
    ``⟨w, x⟩ = ⟨Qᵀw, z⟩``, ``‖w‖ = ‖Qᵀw‖``, so fitting on ``Z`` gives the same predictions, losses and chosen
    regularisation as fitting on ``X``, at ``N`` features instead of ``D``. Rows of every split (train and test)
    must all be in ``x``.
    """
    n, d = x.shape
    gram = np.zeros((n, n))
    for start in range(0, d, column_chunk):
        block = np.asarray(x[:, start:start + column_chunk], np.float64)
        gram += block @ block.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    kept = eigenvalues > 1e-12 * max(eigenvalues.max(), 0.0)
    return (eigenvectors[:, kept] * np.sqrt(eigenvalues[kept])).astype(np.float32)


def row_space_peak_bytes(n: int, d: int | None = None, column_chunk: int = 8192) -> int:
    """Peak memory of :func:`row_space_features` on ``N = n`` rows of ``d`` columns (None: at least
    ``column_chunk``, e.g. a vocabulary), in bytes:
    ``8·(5N² + N·min(d, column_chunk))``: the float64 Gram ``K`` (N²), LAPACK's copy of it, ``dsyevd``'s
    ≈ 2N² workspace and the eigenvectors (N² each), plus one float64 column block. Measured 2026-12-05 at
    N = 3,000, d = 3,500 (``ru_maxrss`` growth 438 MiB against 423 MiB predicted)."""
    return 8 * (5 * n * n + n * min(d or column_chunk, column_chunk))


def available_memory_bytes() -> int:
    """The memory the kernel reports available (``MemAvailable`` of ``/proc/meminfo``), else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_row_space_fits(n: int, d: int | None = None, limit_bytes: int | None = None, what: str = "p_f") -> None:
    """Refuses, before anything is computed, a :func:`row_space_features` call whose peak memory
    (:func:`row_space_peak_bytes`) exceeds ``limit_bytes`` (default: the memory available now)."""
    limit = available_memory_bytes() if limit_bytes is None else int(limit_bytes)
    need = row_space_peak_bytes(n, d)
    if need > limit:
        raise SentcompError(
            f"The {what} column needs the {n:,} × {n:,} float64 kernel matrix and its eigendecomposition: about "
            f"{need / 1e9:.1f} GB at peak (the Gram alone {8 * n * n / 1e9:.1f} GB), more than the "
            f"{limit / 1e9:.1f} GB allowed. Drop the column, use projected_p_f (A p_f(s), d columns, streamed), "
            "take fewer examples (n_train / n_test), or run it on a machine with more memory."
        )


def paper_c_grid(n_train: int) -> np.ndarray:
    """The authors' C grid: ``10⁻⁶..10³`` (10 values) when ``n_train < 10,000``, else ``10⁻³..10²`` (6)."""
    low, high = (-6, 3) if n_train < PAPER_LARGE_N else (-3, 2)
    return 10.0 ** np.arange(low, high + 1)


def default_grid(protocol: str, n_train: int) -> np.ndarray:
    """The regularisation grid of each protocol (C for logistic regression, α for ridge), ascending."""
    if protocol == "paper":
        return paper_c_grid(n_train)
    if protocol == "senteval":
        return 2.0 ** np.arange(-2, 4)
    if protocol == "mteb":
        return np.array([1.0])
    return 10.0 ** np.arange(-3, 7)


def unshuffled_stratified_folds(labels: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold index per example as scikit-learn's ``StratifiedKFold(n_folds)`` without shuffling deals them (what
    ``LogisticRegressionCV(cv=5)`` uses, and so the authors' recipe): each class's examples, in data order,
    go to folds in consecutive blocks."""
    from sklearn.model_selection import StratifiedKFold

    folds = np.empty(len(labels), np.int64)
    for fold, (_, test) in enumerate(StratifiedKFold(n_folds).split(np.zeros(len(labels)), labels)):
        folds[test] = fold
    return folds


def check_settings(protocol: str = "paper", multi_class: str = "ovr", cv_metric: str = "accuracy",
                   n_folds: int | None = None, max_iter: int = 1, n_experiments: int = 1,
                   samples_per_label: int | None = None) -> None:
    """The settings of :func:`evaluate` that need no data: a known protocol, multi-class mode and CV metric,
    ``max_iter`` ≥ 1, and what the protocol uses: ``n_folds`` ≥ 2 (None: the default 5) for cross-validation,
    ``n_experiments`` ≥ 1 and ``samples_per_label`` ≥ 1 (or None) for ``"mteb"``. :class:`ProbeOptions` checks
    them when built; a program calls it before any work (``check_config``), so a typo does not surface after the
    model ran."""
    if protocol not in PROTOCOLS:
        raise SentcompError(f"unknown probe protocol {protocol!r}; choose one of {PROTOCOLS}")
    if multi_class not in kernels.MULTI_CLASS_MODES:
        raise SentcompError(f"multi_class must be one of {kernels.MULTI_CLASS_MODES}, got {multi_class!r}")
    if cv_metric not in CV_METRICS:
        raise SentcompError(f"cv_metric must be one of {CV_METRICS}, got {cv_metric!r}")
    minimums = {"max_iter": (max_iter, 1)}
    if protocol == "mteb":
        minimums.update(n_experiments=(n_experiments, 1), samples_per_label=(samples_per_label or 1, 1))
    elif n_folds is not None:
        minimums["n_folds"] = (n_folds, 2)
    for name, (value, least) in minimums.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise SentcompError(f"probe {name} must be a whole number ≥ {least}, got {value!r}")


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index per example: each class shuffled (seeded) and dealt round-robin, continuing across classes,
    so every class is split evenly and fold sizes differ by at most one."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    folds = np.empty(len(labels), np.int64)
    folds[order] = np.arange(len(labels)) % n_folds
    return folds


def undersample(labels: np.ndarray, samples_per_label: int, n_experiments: int, seed: int = 0) -> list[np.ndarray]:
    """MTEB's training subsets, one per experiment, drawn as current MTEB draws them
    (``AbsTaskClassification._undersample_data``): the row order starts as ``0..N−1``; each experiment shuffles
    the previous experiment's order in place with a fresh ``numpy.random.RandomState(seed)`` (so experiment ``e``
    applies the same permutation ``e + 1`` times) and keeps the first ``samples_per_label`` rows of each label in
    that order (every row of a label with fewer). MTEB's own seed is 42. Each subset's row indices are returned
    sorted (the probe's fit does not depend on the row order)."""
    order = np.arange(len(labels))
    subsets = []
    for _ in range(n_experiments):
        np.random.RandomState(seed).shuffle(order)
        ordered = labels[order]
        subsets.append(np.sort(np.concatenate(
            [order[ordered == label][:samples_per_label] for label in np.unique(labels)])))
    return subsets


def _mteb_splits(train_ids: np.ndarray, n_experiments: int, samples_per_label: int | None, seed: int):
    """``(rows, weights [E, R])``: the training rows any experiment uses, and one 0/1 row of weights over them
    per experiment (:func:`undersample`; a single experiment on every row when ``samples_per_label`` is None)."""
    if samples_per_label is None:
        return np.arange(len(train_ids)), np.ones((1, len(train_ids)), np.float32)
    if not (isinstance(n_experiments, int) and n_experiments >= 1
            and isinstance(samples_per_label, int) and samples_per_label >= 1):
        raise SentcompError("n_experiments and samples_per_label must be positive integers (samples_per_label=None: "
                            f"all of train), got {n_experiments!r} and {samples_per_label!r}")
    subsets = undersample(train_ids, samples_per_label, n_experiments, seed)
    rows = np.unique(np.concatenate(subsets))
    return rows, np.stack([np.isin(rows, subset) for subset in subsets]).astype(np.float32)


def _features(x, name: str) -> np.ndarray:
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise SentcompError(f"{name} must be a numeric array of shape [examples, features]: {error}") from None
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise SentcompError(f"{name} must have shape [examples, features] with both > 0, got {x.shape}")
    with np.errstate(invalid="ignore"):  # inf − inf → NaN is the signal here
        # NaN and ±inf survive a float64 sum of float32s, which cannot overflow
        if np.isfinite(np.sum(x, dtype=np.float64)):
            return x
    bad = ~np.isfinite(x)
    rows = np.flatnonzero(bad.any(axis=1))
    raise SentcompError(
        f"{name} has {bad.sum()} NaN/inf values in {len(rows)} rows (first rows: {rows[:5].tolist()}); "
        "fix the feature extraction (e.g. fp16 overflow, empty inputs) or drop those rows"
    )


def _with_constant_column(x: np.ndarray) -> np.ndarray:
    """``[x, 1]``: liblinear's synthetic intercept feature (``intercept_scaling=1``)."""
    return np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)


def _labels(y, n: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise SentcompError(f"{name} must be a 1-D array with one label per feature row ({n}), got shape {y.shape}")
    return y


def encode_labels(y_train, y_others: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Maps labels to ``0..K−1`` by the sorted unique training labels; other sets must use the same labels."""
    try:
        classes, train_ids = np.unique(y_train, return_inverse=True)
    except TypeError:
        raise SentcompError("y_train mixes label types that cannot be sorted (e.g. str and int); "
                            "use one type") from None
    if len(classes) < 2:
        raise SentcompError(f"y_train has a single class {classes.tolist()}: a probe needs at least two classes")
    encoded = {}
    for name, y in y_others.items():
        if y.dtype.kind != classes.dtype.kind and not (y.dtype.kind in "iuf" and classes.dtype.kind in "iuf"):
            raise SentcompError(f"{name} labels are {y.dtype} but y_train labels are {classes.dtype}: use one encoding")
        ids = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
        unseen = classes[ids] != y
        if unseen.any():
            raise SentcompError(
                f"{name} has labels never seen in y_train: {np.unique(y[unseen])[:5].tolist()} "
                f"(train classes: {classes.tolist()[:10]}); check both use the same label encoding"
            )
        encoded[name] = ids
    return classes, train_ids, encoded


def _check_folds(folds, n: int, n_folds) -> tuple[np.ndarray, int]:
    folds = np.asarray(folds)
    if folds.shape != (n,) or folds.dtype.kind not in "iu":
        raise SentcompError(f"folds must be one integer fold index per training example ({n}), "
                            f"got {folds.shape} {folds.dtype}")
    count = int(folds.max()) + 1 if n_folds is None else n_folds
    sizes = np.bincount(folds, minlength=count) if folds.min() >= 0 else None
    if sizes is None or len(sizes) != count or count < 2 or (sizes == 0).any():
        raise SentcompError("folds must take every value 0..F−1 (F ≥ 2) at least once, "
                            f"got values {np.unique(folds)[:10].tolist()}")
    return folds, count


def _grid(grid, protocol: str, n_train: int) -> np.ndarray:
    grid = default_grid(protocol, n_train) if grid is None else np.asarray(grid, np.float64).ravel()
    if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise SentcompError(f"the regularisation grid must be positive finite numbers, got {grid.tolist()}")
    return np.sort(grid)


def _splits(n_train: int, n_dev: int, folds: np.ndarray | None, n_folds: int):
    """Training weights ``[S, N_all]`` and validation masks ``[S, N_all]`` over the rows ``train ++ dev``.

    K-fold: split ``s < F`` trains on every fold but ``s`` and is scored on ``s``; split ``F`` trains on all of
    train (the refit). Dev set: one split trained on train and scored on dev. Neither: one split, no scores.
    Returns ``(weights, validation, final_split)``.
    """
    n_all = n_train + n_dev
    is_train = np.arange(n_all) < n_train
    if folds is not None:
        fold_of = np.concatenate([folds, np.full(n_dev, -1)])
        validation = np.stack([fold_of == s for s in range(n_folds)] + [np.zeros(n_all, bool)])
        weights = np.stack([is_train & (fold_of != s) for s in range(n_folds)] + [is_train])
        return weights.astype(np.float32), validation, n_folds
    return is_train[None].astype(np.float32), (~is_train)[None], 0


def _grouped(arrays, row_groups):
    """Rows of each ``arrays [N, ...]`` gathered per group and zero-padded to the largest group:
    ``([G, M, ...] per array, mask [G, M])``."""
    arrays = [np.asarray(a) for a in arrays]
    size = max(len(rows) for rows in row_groups)
    mask = np.zeros((len(row_groups), size), np.float32)
    grouped = [np.zeros((len(row_groups), size) + a.shape[1:], a.dtype) for a in arrays]
    for g, rows in enumerate(row_groups):
        mask[g, : len(rows)] = 1.0
        for out, a in zip(grouped, arrays):
            out[g, : len(rows)] = a[rows]
    return grouped, mask


def fold_layout(x: np.ndarray, targets: np.ndarray, folds: np.ndarray, n_folds: int):
    """Rows grouped by fold and zero-padded to the largest fold: ``(x [F, M, d], targets [F, M, T], mask [F, M])``,
    the layout of :func:`kfold_moments` and :func:`sentcomp.kernels.kfold_ridge_moments`."""
    (x_folds, y_folds), mask = _grouped((x, targets), [np.flatnonzero(folds == f) for f in range(n_folds)])
    return x_folds, y_folds, mask


def kfold_moments(x_folds: np.ndarray, targets_folds: np.ndarray, mask: np.ndarray):
    """The K-fold splits' ridge moments from data laid out by fold (:func:`sentcomp.kernels.fold_moments`); on
    CPU each fold's Gram matrix is numpy's BLAS ``syrk``, about twice as fast as XLA's general product there."""
    if jax.default_backend() == "cpu":
        return kernels.kfold_split_moments(kernels.fold_moments(x_folds, targets_folds, mask, xp=np))
    return kernels.kfold_ridge_moments(x_folds, targets_folds, mask)


def ridge_targets(labels, num_classes: int):
    """sklearn ``RidgeClassifier``'s targets ``[..., K']``: one ±1 column for two classes (score > 0 means class
    1), one-hot columns otherwise (±1 one-vs-all and one-hot give the same argmax once there is an intercept)."""
    return kernels.logistic_targets(labels, num_classes, "multinomial")


def _ridge_fits(moments, grid, split_sizes, n_features: int, standardize: bool):
    """``(fits, method)``: ``ridge_grid`` by preconditioned CG when every split has ≥
    ``RIDGE_PCG_MIN_ROWS_PER_FEATURE`` rows per feature (CV splits then resemble the refit, and CG converges
    in a few steps), else — or if CG did not reach ``RIDGE_TOL`` — by one ``eigh`` per split."""
    if split_sizes.min() >= RIDGE_PCG_MIN_ROWS_PER_FEATURE * n_features:
        fits = kernels.ridge_grid(moments, grid, standardize=standardize, tol=RIDGE_TOL)
        if np.all(np.asarray(fits.grad_norm) <= RIDGE_TOL):
            return fits, "pcg"
    return kernels.ridge_grid(moments, grid, standardize=standardize, method="eigh"), "eigh"


def _fit(protocol, x_all, y_all, weights, grid, num_classes, folded, *, multi_class, standardize, max_iter, tol,
         fit_intercept=True):
    """``(fits, solver)`` for every split × grid value. ``folded``: K-fold data laid out by fold
    (``(x [F, M, d], labels [F, M]), mask [F, M]``), or None."""
    if protocol != "ridge":
        return kernels.logistic_regression_grid(
            x_all, y_all, weights, grid, num_classes=num_classes, multi_class=multi_class,
            standardize=standardize, max_iter=max_iter, tol=tol, fit_intercept=fit_intercept,
        ), "lbfgs"
    if x_all.shape[0] < x_all.shape[1]:  # fewer rows than features: the N × N kernel matrix is the smaller one
        targets = ridge_targets(y_all, num_classes)
        support = tuple(np.flatnonzero(split) for split in weights)  # each split's kernel matrix on its own rows
        return kernels.ridge_grid_dual(x_all, targets, weights, grid, standardize=standardize, support=support), "dual"
    if folded is not None:  # fold Gram matrices once, each split's as the sum of its folds' (order as in _splits)
        (x_folds, y_folds), mask = folded
        moments = kfold_moments(x_folds, np.asarray(ridge_targets(y_folds, num_classes)), mask)
    else:
        moments = kernels.ridge_moments(x_all, np.asarray(ridge_targets(y_all, num_classes)), weights)
    return _ridge_fits(moments, grid, weights.sum(axis=1), x_all.shape[1], standardize)


def _converged(protocol, fits, split: int, index: int, max_iter: int, tol: float) -> bool:
    """Whether one fit reached its tolerance: the ridge CG residual ``≤ RIDGE_TOL`` (0 for direct solves); for
    L-BFGS, stopped before ``max_iter`` with a gradient within ``LBFGS_CONVERGED_GRAD_FACTOR × tol``."""
    grad_norm = float(fits.grad_norm[split, index])
    if protocol == "ridge":
        return grad_norm <= RIDGE_TOL
    return int(fits.iterations[split, index]) < max_iter and grad_norm <= LBFGS_CONVERGED_GRAD_FACTOR * tol


def _example_losses(scores, labels, protocol: str, num_classes: int, multi_class: str):
    """Each example's loss under the probe's own objective, ``scores [..., K'], labels [...] -> [...]``: binary or
    softmax cross-entropy, the sum of the K binary losses for one-vs-rest, the squared error to
    ``ridge_targets`` for ridge."""
    if protocol == "ridge":
        return jnp.sum(jnp.square(ridge_targets(labels, num_classes) - scores), axis=-1)
    targets = kernels.logistic_targets(labels, num_classes, multi_class)
    return kernels.logistic_losses(scores, targets, kernels.uses_sigmoid(num_classes, multi_class))


@functools.partial(jax.jit, static_argnames=("protocol", "num_classes", "multi_class"))
def _path_scores(x, labels, mask, coef, intercept, *, protocol: str, num_classes: int, multi_class: str):
    """Accuracy and mean loss ``[G, L]`` of each group's probe path ``coef [G, L, d, K']``, ``intercept [G, L,
    K']`` on that group's rows ``x [G, M, d]``, ``labels [G, M]`` (``mask [G, M]`` marks real rows), and the
    predictions ``[G, L, M]``: one compiled call for every fold × regularisation."""
    scores = jnp.einsum("gmd,gldk->glmk", x, coef) + intercept[:, :, None, :]
    labels, mask, rows = labels[:, None], mask[:, None], jnp.sum(mask, axis=1)[:, None]
    predictions = kernels.predict_labels(scores)
    losses = _example_losses(scores, labels, protocol, num_classes, multi_class)
    correct = jnp.sum(jnp.where(mask > 0, predictions == labels, False), axis=-1)  # an integer count, exactly
    return correct / rows, jnp.sum(mask * losses, axis=-1) / rows, predictions


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """How :func:`evaluate` fits and chooses its probe (the protocols: module docstring). Checked when built
    (:func:`check_settings` and the combinations no protocol allows), so a program can build its options in
    ``check_config``, before any work, and a typo does not surface after the model ran.

    ``n_folds``: stratified folds of the cross-validation (None: 5), dealt seeded (``seed``) or, with
    ``shuffle_folds=False``, as scikit-learn's unshuffled ``StratifiedKFold`` (:func:`unshuffled_stratified_folds`,
    the authors' ``LogisticRegressionCV(cv=5)``). ``grid``: the C (ridge α) values searched (None: the protocol's,
    :func:`default_grid`). ``standardize``: features standardised with each split's own training statistics.
    ``cv_metric``: the regularisation with the highest mean validation ``"accuracy"`` (the paper's) or the lowest
    mean validation ``"loss"`` (the probe's own per-example loss: logistic or squared error,
    :func:`_example_losses`) wins. ``max_iter``, ``tol``: L-BFGS's limits. ``n_experiments``,
    ``samples_per_label``: the ``"mteb"`` protocol's undersampling (:func:`undersample`, seeded by ``seed``;
    ``samples_per_label=None``: one probe on all of train; other protocols ignore both).
    ``penalize_intercept=True`` penalises the intercept like the weights, as liblinear does (sklearn's
    ``solver="liblinear"``, ``intercept_scaling=1``: ``C Σ ℓ + ½(‖W‖² + ‖b‖²)``; logistic protocols, unscaled
    features).
    """

    protocol: str = "paper"
    multi_class: str = "multinomial"
    n_folds: int | None = None
    shuffle_folds: bool = True
    grid: Sequence[float] | None = None
    standardize: bool = False
    cv_metric: str = "accuracy"
    seed: int = 0
    max_iter: int = 1000
    tol: float = 1e-4
    n_experiments: int = MTEB_N_EXPERIMENTS
    samples_per_label: int | None = MTEB_SAMPLES_PER_LABEL
    penalize_intercept: bool = False

    def __post_init__(self):
        check_settings(self.protocol, self.multi_class, self.cv_metric, self.n_folds, self.max_iter,
                       self.n_experiments, self.samples_per_label)
        if self.protocol == "mteb" and self.multi_class != "multinomial":
            raise SentcompError(f"protocol 'mteb' is MTEB's multinomial LogisticRegression; multi_class="
                                f"{self.multi_class!r} is not MTEB's protocol (use multi_class='multinomial', or "
                                "protocol 'paper' for OvR)")
        if self.penalize_intercept and (self.protocol == "ridge" or self.standardize):
            raise SentcompError("penalize_intercept=True is liblinear's logistic intercept: use a logistic protocol "
                                f"(not {self.protocol!r}) with standardize=False")

    @classmethod
    def from_config(cls, config, **overrides) -> ProbeOptions:
        """The options a program's ``config.probe`` (a ConfigDict or mapping) sets, its other keys ignored (e.g. a
        program's own ``every`` or ``task``), then ``overrides``."""
        given = {field.name: config[field.name] for field in dataclasses.fields(cls) if field.name in config}
        return cls(**{**given, **overrides})

    def replace(self, **settings) -> ProbeOptions:
        """These options with ``settings`` changed; an unknown name is one clear error listing the known ones."""
        return replace_settings(self, settings, "probe option")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What :func:`evaluate` found: the chosen probe, its scores and how it was fitted. ``to_json()`` gives every
    field by name with arrays as nested lists (a JSON-ready dict, fields in this order)."""

    protocol: str
    multi_class: str  # the probe's multi-class mode; "one-vs-all ridge" for ridge
    classes: list  # the original label of each class index 0..K−1 (the sorted unique training labels)
    regularisation_name: str  # "C" (logistic) or "alpha" (ridge)
    grid: list[float]  # the regularisation values searched, ascending
    regularisation: float  # the chosen C or α
    best_index: int  # its index in grid
    cv_metric: str  # "accuracy" or "loss"
    cv_scores: np.ndarray  # validation cv_metric [grid, fold]; one column for a dev set, none for "mteb"
    cv_mean: np.ndarray  # [grid] mean over the folds (NaN without validation)
    folds: np.ndarray | None  # the fold index of each training example (None for a dev set or "mteb")
    test_accuracy: float  # mean over the experiments for "mteb"
    test_macro_f1: float  # sklearn's f1_score(average="macro"), mean over the experiments for "mteb"
    test_loss: float  # the probe's own mean loss on test (logistic, or squared error for ridge)
    train_accuracy: float  # of the final probe, on the rows it was trained on
    test_accuracy_per_regularisation: np.ndarray  # [grid]: a diagnostic of the whole path, never used to choose
    experiment_test_accuracy: list[float]  # each "mteb" experiment's (one entry otherwise)
    experiment_test_macro_f1: list[float]
    coef: np.ndarray  # the final probe's [d, K'] ([E, d, K'] for "mteb"'s E > 1 experiments)
    intercept: np.ndarray  # [K'] ([E, K'])
    objective: float  # the final probe's objective (mean over experiments)
    iterations: int  # its solver iterations (largest over experiments)
    grad_norm: float  # its final gradient norm or CG residual (largest over experiments)
    solver: str  # lbfgs; for ridge pcg or eigh on the d × d Gram, dual on the N × N kernel (fewer rows than features)
    converged: bool  # whether the final probe (every experiment's) reached its tolerance (:func:`_converged`)
    cv_fits: int  # how many cross-validation fits chose the regularisation
    cv_not_converged: int  # how many of them stopped short of their tolerance

    def to_json(self) -> dict[str, Any]:
        """Every field by name, numpy arrays and scalars as Python lists and numbers."""
        return {field.name: _json_ready(getattr(self, field.name)) for field in dataclasses.fields(self)}


def _json_ready(value):
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The checked features and their labels as class indices ``0..K−1`` of ``classes``."""

    x_train: np.ndarray
    x_test: np.ndarray
    x_dev: np.ndarray | None
    classes: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    dev_ids: np.ndarray | None


def prepare_inputs(x_train, y_train, x_test, y_test, x_dev, y_dev, options: ProbeOptions) -> _Inputs:
    """Features checked (:func:`_features`: 2-D, finite, as many columns in every set), labels encoded by the
    sorted unique training labels (:func:`encode_labels`), and liblinear's constant column appended for
    ``penalize_intercept``."""
    x_train, x_test = _features(x_train, "x_train"), _features(x_test, "x_test")
    y_train, y_test = _labels(y_train, len(x_train), "y_train"), _labels(y_test, len(x_test), "y_test")
    sets = {"y_test": y_test}
    if (x_dev is None) != (y_dev is None):
        raise SentcompError("give both x_dev and y_dev, or neither")
    if x_dev is not None:
        if options.protocol in ("paper", "mteb"):
            raise SentcompError(f"protocol {options.protocol!r} does not use a dev set; "
                                "use 'senteval' or 'ridge', or drop x_dev")
        x_dev = _features(x_dev, "x_dev")
        sets["y_dev"] = _labels(y_dev, len(x_dev), "y_dev")
    for name, x in (("x_test", x_test), ("x_dev", x_dev)):
        if x is not None and x.shape[1] != x_train.shape[1]:
            raise SentcompError(f"{name} has {x.shape[1]} features but x_train has {x_train.shape[1]}")
    classes, train_ids, encoded = encode_labels(y_train, sets)
    if options.penalize_intercept:
        x_train, x_test = _with_constant_column(x_train), _with_constant_column(x_test)
        x_dev = None if x_dev is None else _with_constant_column(x_dev)
    return _Inputs(x_train, x_test, x_dev, classes, train_ids, encoded["y_test"], encoded.get("y_dev"))


def fold_assignment(inputs: _Inputs, folds, options: ProbeOptions) -> tuple[np.ndarray | None, int]:
    """``(fold index per training example, number of folds)`` of the cross-validation: ``folds`` as given, else
    stratified (:func:`stratified_folds`, or :func:`unshuffled_stratified_folds`); ``(None, 0)`` where nothing is
    cross-validated (``"mteb"``, or a dev set)."""
    n_train, n_folds = len(inputs.x_train), options.n_folds
    if options.protocol == "mteb" or inputs.x_dev is not None:
        if folds is not None:
            raise SentcompError(f"folds are not used by protocol {options.protocol!r}"
                                f"{' with a dev set' if inputs.x_dev is not None else ''}")
        return None, 0
    if folds is not None:
        return _check_folds(folds, n_train, n_folds)
    n_folds = 5 if n_folds is None else int(n_folds)
    if not 2 <= n_folds <= n_train:
        raise SentcompError(f"n_folds must be between 2 and the number of training examples ({n_train}), "
                            f"got {n_folds}")
    if options.shuffle_folds:
        return stratified_folds(inputs.train_ids, n_folds, options.seed), n_folds
    return unshuffled_stratified_folds(inputs.train_ids, n_folds), n_folds


@dataclasses.dataclass(frozen=True)
class _Splits:
    """Every fit of one evaluation over the rows ``x_all``/``y_all``: split ``s`` trains with ``weights[s]`` and is
    validated on ``validation[s]``; ``finals`` are the final probes' splits (the refit, or each MTEB experiment)."""

    x_all: np.ndarray
    y_all: np.ndarray
    weights: np.ndarray  # [S, N_all] float32
    validation: np.ndarray  # [S, N_all] bool
    finals: np.ndarray

    @property
    def scored(self) -> list[int]:
        """The splits with validation rows."""
        return [s for s in range(len(self.weights)) if self.validation[s].any()]


def training_splits(inputs: _Inputs, fold_ids: np.ndarray | None, n_folds: int, options: ProbeOptions) -> _Splits:
    """``"mteb"``: one split per experiment over the rows any experiment uses (:func:`_mteb_splits`), none
    validated; otherwise the K-fold splits and the refit over train, or one split trained on train and validated
    on dev (:func:`_splits`)."""
    if options.protocol == "mteb":
        rows, weights = _mteb_splits(inputs.train_ids, options.n_experiments, options.samples_per_label, options.seed)
        return _Splits(inputs.x_train[rows], inputs.train_ids[rows], weights, np.zeros(weights.shape, bool),
                       np.arange(len(weights)))
    x_dev = inputs.x_dev
    x_all = inputs.x_train if x_dev is None else np.concatenate([inputs.x_train, x_dev])
    y_all = inputs.train_ids if x_dev is None else np.concatenate([inputs.train_ids, inputs.dev_ids])
    weights, validation, final = _splits(len(inputs.x_train), 0 if x_dev is None else len(x_dev), fold_ids, n_folds)
    return _Splits(x_all, y_all, weights, validation, np.array([final]))


def _scores(x, labels, coef, intercept, mask=None, *, protocol: str, num_classes: int, multi_class: str):
    """``(accuracy, mean loss, predictions)`` of every probe of a path (:func:`_path_scores`) as numpy arrays;
    ``mask`` None: every row is real."""
    mask = np.ones(labels.shape, np.float32) if mask is None else mask
    accuracy, loss, predictions = _path_scores(x, labels, mask, coef, intercept, protocol=protocol,
                                               num_classes=num_classes, multi_class=multi_class)
    return np.asarray(accuracy), np.asarray(loss), np.asarray(predictions)


def choose_regularisation(held_out, coef, intercept, splits: _Splits, grid: np.ndarray, score, cv_metric: str):
    """``(cv_scores [grid, fold], cv_mean [grid], best index)``: each validated split's ``cv_metric`` along the
    grid, the best mean (highest accuracy or lowest loss, the first, i.e. strongest regularisation, on ties);
    index 0 and no scores when nothing is validated."""
    scored = splits.scored
    if not scored:
        return np.zeros((len(grid), 0)), np.full(len(grid), np.nan), 0
    (x_val, y_val), val_mask = held_out
    cv_scores = score(x_val, y_val, coef[scored], intercept[scored], val_mask)[CV_METRICS.index(cv_metric)].T
    cv_mean = cv_scores.mean(axis=1)
    return cv_scores, cv_mean, int(np.argmax(cv_mean)) if cv_metric == "accuracy" else int(np.argmin(cv_mean))


def score_final_probes(inputs: _Inputs, splits: _Splits, coef, intercept, best: int, score) -> dict[str, Any]:
    """The final probes (the refit, or each MTEB experiment) on test along the whole grid (one flattened path),
    and at ``best`` their test macro-F1 and accuracy on the rows they were trained on: ``test_path`` and
    ``test_losses`` ``[finals, grid]``, ``test_f1`` and ``train_accuracy`` ``[finals]``."""
    finals, n_grid = splits.finals, coef.shape[1]
    n_finals = len(finals)
    (test_path,), (test_losses,), (test_predictions,) = score(
        inputs.x_test[None], inputs.test_ids[None], coef[finals].reshape(1, n_finals * n_grid, *coef.shape[2:]),
        intercept[finals].reshape(1, n_finals * n_grid, -1))
    test_f1 = [statistics.macro_f1(inputs.test_ids, predictions)
               for predictions in test_predictions.reshape(n_finals, n_grid, -1)[:, best]]
    (x_fitted, y_fitted), fitted_mask = _grouped((splits.x_all, splits.y_all),
                                                 [np.flatnonzero(splits.weights[s]) for s in finals])
    train_accuracy = score(x_fitted, y_fitted, coef[finals, best][:, None], intercept[finals, best][:, None],
                           fitted_mask)[0]
    return {"test_path": test_path.reshape(n_finals, n_grid), "test_losses": test_losses.reshape(n_finals, n_grid),
            "test_f1": test_f1, "train_accuracy": train_accuracy}


def evaluate(x_train, y_train, x_test, y_test, protocol: str | None = None, *, x_dev=None, y_dev=None, folds=None,
             options: ProbeOptions | None = None, **settings) -> ProbeResult:
    """Fits a linear probe on ``(x_train, y_train)`` by ``options`` and scores it on ``(x_test, y_test)``.

    ``x_*`` are ``[examples, features]`` arrays, ``y_*`` labels of any sortable type; ``x_dev, y_dev`` a dev set
    (``"senteval"``, ``"ridge"``); ``folds`` one fold index per training example (overrides the stratified
    ``n_folds`` split). ``options`` (default :class:`ProbeOptions`'s) with ``protocol`` and any keyword
    ``settings`` (``multi_class="ovr"``, ``grid=[1.0]``, ...: fields of :class:`ProbeOptions`) replaced. The
    steps: inputs checked and labels encoded (:func:`prepare_inputs`), folds dealt (:func:`fold_assignment`),
    the splits (:func:`training_splits`: folds and refit, dev, or MTEB's experiments) fitted along the grid in
    one call (:func:`_fit`), the regularisation chosen on the validated splits (:func:`choose_regularisation`),
    the final probes scored (:func:`score_final_probes`). Returns a :class:`ProbeResult`.
    """
    options = (options or ProbeOptions()).replace(**settings, **({} if protocol is None else {"protocol": protocol}))
    inputs = prepare_inputs(x_train, y_train, x_test, y_test, x_dev, y_dev, options)
    grid = _grid(options.grid, options.protocol, len(inputs.x_train))
    if options.protocol == "mteb" and len(grid) != 1:
        raise SentcompError(f"protocol 'mteb' fits one C and searches none; give one grid value, got {grid.tolist()}")
    fold_ids, n_folds = fold_assignment(inputs, folds, options)
    splits = training_splits(inputs, fold_ids, n_folds, options)
    scored, num_classes = splits.scored, len(inputs.classes)
    held_out = _grouped((splits.x_all, splits.y_all), [np.flatnonzero(splits.validation[s]) for s in scored]) \
        if scored else None
    fits, solver = _fit(  # K-fold: held-out group s is fold s, the layout of the ridge moments
        options.protocol, splits.x_all, splits.y_all, splits.weights, grid, num_classes,
        held_out if fold_ids is not None else None, multi_class=options.multi_class,
        standardize=options.standardize, max_iter=options.max_iter, tol=options.tol,
        fit_intercept=not options.penalize_intercept,
    )
    coef, intercept = np.asarray(fits.coef), np.asarray(fits.intercept)  # [S, L, d, K'], [S, L, K']
    score = functools.partial(_scores, protocol=options.protocol, num_classes=num_classes,
                              multi_class=options.multi_class)
    cv_scores, cv_mean, best = choose_regularisation(held_out, coef, intercept, splits, grid, score,
                                                     options.cv_metric)
    final = score_final_probes(inputs, splits, coef, intercept, best, score)
    finals = splits.finals
    final_coef, final_intercept = coef[finals, best], intercept[finals, best]
    if options.penalize_intercept:  # the constant column's weight is the (penalised) intercept
        final_coef, final_intercept = final_coef[..., :-1, :], final_coef[..., -1, :]
    converged = functools.partial(_converged, options.protocol, fits, max_iter=options.max_iter, tol=options.tol)
    ridge = options.protocol == "ridge"
    return ProbeResult(
        protocol=options.protocol,
        multi_class="one-vs-all ridge" if ridge else options.multi_class,
        classes=inputs.classes.tolist(),
        regularisation_name="alpha" if ridge else "C",
        grid=grid.tolist(),
        regularisation=float(grid[best]),
        best_index=best,
        cv_metric=options.cv_metric,
        cv_scores=cv_scores,
        cv_mean=cv_mean,
        folds=fold_ids,
        test_accuracy=float(final["test_path"][:, best].mean()),
        test_macro_f1=float(np.mean(final["test_f1"])),
        test_loss=float(final["test_losses"][:, best].mean()),
        train_accuracy=float(final["train_accuracy"].mean()),
        test_accuracy_per_regularisation=final["test_path"].mean(axis=0),
        experiment_test_accuracy=final["test_path"][:, best].tolist(),
        experiment_test_macro_f1=final["test_f1"],
        coef=final_coef[0] if len(finals) == 1 else final_coef,
        intercept=final_intercept[0] if len(finals) == 1 else final_intercept,
        objective=float(np.mean(np.asarray(fits.objective)[finals, best])),
        iterations=int(np.max(np.asarray(fits.iterations)[finals, best])),
        grad_norm=float(np.max(np.asarray(fits.grad_norm)[finals, best])),
        solver=solver,
        converged=all(converged(split, best) for split in finals),
        cv_fits=len(scored) * len(grid),
        cv_not_converged=sum(not converged(split, index) for split in scored for index in range(len(grid))),
    )
