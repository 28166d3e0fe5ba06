"""L2 logistic regression as a pure jnp kernel, one probe per split × C in a single compiled call.

Splits, optional standardisation and the fits' layout (:class:`LinearFits`): see :mod:`sentcomp.kernels.linear`.

Conventions (scikit-learn's, made explicit)
-------------------------------------------
Logistic regression, inverse regularisation ``C`` and sample weights ``w_i`` (0/1 fold masks here)::

    minimise_{W, b}   C Σ_i w_i ℓ(x_iᵀW + b, y_i)  +  ½‖W‖²_F          (intercept b unpenalised)

which is ``C·n`` times the mean-loss form ``(1/n) Σ_i w_i ℓ_i + (λ/2)‖W‖²`` with ``λ = 1/(n·C)``,
``n = Σ_i w_i``. The solver works in the mean form (better scaled); objectives are reported in sklearn's.
``ℓ`` is

* ``"multinomial"`` (default): softmax cross-entropy over K weight columns (sklearn's multinomial
  ``LogisticRegression``); for K = 2 it is the binomial loss with a single column, as in sklearn;
* ``"ovr"``: one-vs-rest, K independent binary problems ``Σ_k log(1 + exp(−y_ik z_ik))`` with
  ``y_ik = ±1``; the sum separates, so this is exactly K binary fits solved side by side.

Solver: L-BFGS (two-loop recursion, Armijo backtracking) on the mean-form objective in preconditioned
coordinates ``W = V diag(κe + λ)^(-1/2) Θ``, where ``V e Vᵀ`` is the eigendecomposition of the feature
covariance and ``κ`` the loss curvature at the start (¼ for sigmoid columns, 1/K for softmax). The Hessian is
then close to the identity whatever the scale or anisotropy of the features (LM hidden states have a few
dimensions hundreds of times larger than the rest), which is what lets a first-order method reach a tight
optimum quickly.

Every product (the solver's and the objective's, hence its gradients') runs at ``precision``, default
``"highest"`` (:mod:`sentcomp.kernels.precision`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sentcomp.kernels.lbfgs import lbfgs_minimise
from sentcomp.kernels.linear import MULTI_CLASS_MODES, LinearFits, linear_scores, weighted_standardisation
from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision


def logistic_columns(num_classes: int, multi_class: str) -> int:
    """Number of weight columns K': 1 for any binary problem, K otherwise (multinomial or one-vs-rest)."""
    if multi_class not in MULTI_CLASS_MODES:
        raise ValueError(f"multi_class must be one of {MULTI_CLASS_MODES}, got {multi_class!r}")
    return 1 if num_classes == 2 else num_classes


def uses_sigmoid(num_classes: int, multi_class: str) -> bool:
    """Whether a logistic probe's columns are sigmoids (binary, or one-vs-rest) rather than one softmax."""
    return num_classes == 2 or multi_class == "ovr"


def curvature_of(num_classes: int, multi_class: str) -> float:
    """An upper bound of the logistic loss's curvature per score: ¼ for sigmoids, 1/K for a K-way softmax
    (the preconditioner's scale of the intercept)."""
    return 0.25 if uses_sigmoid(num_classes, multi_class) else 1.0 / num_classes


@functools.partial(jax.jit, static_argnames=("num_classes", "multi_class"))
def logistic_targets(labels: jax.Array, num_classes: int, multi_class: str) -> jax.Array:
    """Targets ``[..., K']`` of labels ``[...]``: ±1 of class 1 (binary), ±1 per class (ovr), or one-hot
    (multinomial)."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if num_classes == 2:
        return 2.0 * one_hot[..., 1:] - 1.0
    return 2.0 * one_hot - 1.0 if multi_class == "ovr" else one_hot


@functools.partial(jax.jit, static_argnames=("sigmoid",))
def logistic_losses(scores: jax.Array, targets: jax.Array, sigmoid: bool) -> jax.Array:
    """Per-example loss ``[N]``: ``Σ_k log(1 + e^{−y_k z_k})`` (sigmoid) or ``logsumexp(z) − yᵀz`` (softmax,
    targets summing to 1), computed as ``logsumexp(z − yᵀz)``: subtracting two large float32 numbers would
    lose the loss entirely at large scores (even make it negative, which a line search then accepts)."""
    if sigmoid:
        return jnp.sum(jax.nn.softplus(-targets * scores), axis=-1)
    return jax.nn.logsumexp(scores - jnp.sum(targets * scores, axis=-1, keepdims=True), axis=-1)


@functools.partial(jax.jit, static_argnames=("num_classes", "multi_class", "precision"))
def logistic_objective(x, labels, weights, c, coef, intercept, num_classes: int, multi_class: str = "multinomial",
                       *, precision=DEFAULT_PRECISION):
    """sklearn's objective ``C Σ_i w_i ℓ(x_iᵀW + b, y_i) + ½‖W‖²`` of one probe on raw features."""
    precision = check_precision(precision)
    targets = logistic_targets(labels, num_classes, multi_class)
    scores = linear_scores(x, coef, intercept, precision=precision)
    losses = logistic_losses(scores, targets, uses_sigmoid(num_classes, multi_class))
    return c * jnp.dot(weights, losses, precision=precision) + 0.5 * jnp.sum(jnp.square(coef))


def _feature_eigenbasis(x: jax.Array, weights: jax.Array, standardize: bool, precision, center: bool = True):
    """Eigendecomposition ``(e, V)`` of the (standardised) weighted feature covariance, for preconditioning
    (``center=False``: the second moment, the Hessian's shape without an intercept)."""
    mean, scale = weighted_standardisation(x, weights, standardize, precision=precision)
    centered = (x - mean * center) / scale
    cov = jnp.matmul((centered * weights[:, None]).T, centered, precision=precision) / jnp.sum(weights)
    eigvals, eigvecs = jnp.linalg.eigh(cov)
    return jnp.maximum(eigvals, 0.0), eigvecs


@functools.partial(
    jax.jit, static_argnames=("num_classes", "multi_class", "standardize", "max_iter", "warm_start", "precision",
                              "fit_intercept")
)
def logistic_regression_grid(
    x: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    c_grid: jax.Array,
    *,
    num_classes: int,
    multi_class: str = "multinomial",
    standardize: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-4,
    warm_start: bool = True,
    precision=DEFAULT_PRECISION,
    fit_intercept: bool = True,
) -> LinearFits:
    """L2 logistic regression with intercept for every split × C in one compiled call.

    ``x [N, d]`` features, ``labels [N]`` in ``0..num_classes−1``, ``weights [S, N]`` one row of sample
    weights per split (0 drops a row), ``c_grid [L]`` sklearn's inverse regularisation. Returns
    :class:`LinearFits` with leading axes ``[S, L]``. Each problem minimises the mean-form objective
    ``(1/n) Σ w_i ℓ_i + (λ/2)‖W‖²``, ``λ = 1/(n C)``, to ``‖∇‖₂ < tol`` in preconditioned coordinates
    (module docstring) with at most ``max_iter`` L-BFGS steps. The splits always run side by side (``vmap``).
    ``warm_start=True`` walks the C grid from strong to weak regularisation, each fit starting from the
    previous solution (a ``scan``; fewer iterations in all, and narrow matrix products that stay
    memory-bound); ``False`` solves every (split, C) from zero side by side, one ``[N, d] × [d, S·L·K']``
    product per step (best when the grid is short or the device is wide). ``precision``: of every product
    (:mod:`sentcomp.kernels.precision`). ``fit_intercept=False`` fixes ``b = 0`` (with a constant feature
    column this is liblinear's penalised intercept; it needs ``standardize=False``, whose centring would bring
    an intercept back).
    """
    precision = check_precision(precision)
    if standardize and not fit_intercept:
        raise ValueError("fit_intercept=False needs standardize=False (centring the features adds an intercept)")
    intercept_factor = curvature_of(num_classes, multi_class) ** -0.5 if fit_intercept else 0.0

    def matmul(a, b):
        return jnp.matmul(a, b, precision=precision)

    x = jnp.asarray(x, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    c_grid = jnp.asarray(c_grid, jnp.float32)
    sigmoid = uses_sigmoid(num_classes, multi_class)
    columns = logistic_columns(num_classes, multi_class)
    targets = logistic_targets(labels, num_classes, multi_class)
    curvature = curvature_of(num_classes, multi_class)
    dim = x.shape[1]
    eigvals, eigvecs = _feature_eigenbasis(x, jnp.max(weights, axis=0), standardize, precision, fit_intercept)

    def fit_one(split_weights, mean, scale, c, start):
        """One problem from ``start = (W, b)`` on standardised features; returns its fit and (W, b)."""
        n = jnp.sum(split_weights)
        lam = 1.0 / (n * c)
        precond = jax.lax.rsqrt(curvature * eigvals + lam)  # [d]

        def standardised_probe(theta):  # θ = (Θ, β) → W = V diag(precond) Θ, b = β/√κ
            scaled = precond[:, None] * theta[:-columns].reshape(dim, columns)
            return matmul(eigvecs, scaled), theta[-columns:] * intercept_factor, scaled

        def raw_probe(coef_std, intercept_std):  # scores of (x − m)/σ = scores of x with coef = W/σ, b − mᵀcoef
            coef = coef_std / scale[:, None]
            return coef, intercept_std - matmul(mean, coef)

        def mean_objective(theta):
            coef_std, intercept_std, scaled = standardised_probe(theta)
            coef, intercept = raw_probe(coef_std, intercept_std)
            losses = logistic_losses(matmul(x, coef) + intercept, targets, sigmoid)
            return matmul(split_weights, losses) / n + 0.5 * lam * jnp.sum(jnp.square(scaled))

        start_coef, start_intercept = start
        init = jnp.concatenate(
            [(matmul(eigvecs.T, start_coef) / precond[:, None]).ravel(), start_intercept * jnp.sqrt(curvature)]
        )
        theta, value, grad_norm, iterations = lbfgs_minimise(mean_objective, init, max_iter, tol, precision=precision)
        coef_std, intercept_std, _ = standardised_probe(theta)
        coef, intercept = raw_probe(coef_std, intercept_std)
        return LinearFits(coef, intercept, value * n * c, grad_norm, iterations), (coef_std, intercept_std)

    means, scales = jax.vmap(lambda w: weighted_standardisation(x, w, standardize, precision=precision))(weights)
    means = means * fit_intercept  # without an intercept the features are used uncentred
    num_splits = weights.shape[0]
    zeros = (jnp.zeros((num_splits, dim, columns), jnp.float32), jnp.zeros((num_splits, columns), jnp.float32))
    fit_splits = jax.vmap(fit_one, in_axes=(0, 0, 0, None, 0))
    if warm_start:
        order = jnp.argsort(c_grid)

        def next_c(start, c):
            fits, solution = fit_splits(weights, means, scales, c, start)
            return solution, fits

        _, fits = jax.lax.scan(next_c, zeros, c_grid[order])  # leading axes [L, S], C ascending
        fits = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1)[:, jnp.argsort(order)], fits)
        return fits
    fits, _ = jax.vmap(fit_splits, in_axes=(None, None, None, 0, None))(weights, means, scales, c_grid, zeros)
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), fits)
