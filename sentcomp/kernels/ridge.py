"""Closed-form ridge as pure jnp kernels, one probe per split × α in a single compiled call.

Splits, optional standardisation and the fits' layout (:class:`LinearFits`): see :mod:`sentcomp.kernels.linear`.

Ridge (sklearn's ``Ridge``)::

    minimise_{W, b}   Σ_i w_i ‖y_i − x_iᵀW − b‖²  +  α‖W‖²_F

with one-hot (or ±1) targets ``y_i``, from the splits' moments (Gram matrices; for K-fold splits each fold's
is computed once, by XLA or, through ``fold_moments(xp=numpy)``, by the host BLAS): one eigendecomposition
of the refit's centered Gram matrix, then preconditioned conjugate gradients for every split × α
(``method="pcg"``), or one eigendecomposition per split and every α for one rescale of its eigenvalues
(``method="eigh"``).

Every product runs at ``precision``, default ``"highest"`` (:mod:`sentcomp.kernels.precision`; a static
argument of the jitted kernels). ``fold_moments(xp=numpy)`` computes in the host BLAS, at full precision.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sentcomp.kernels.linear import LinearFits, weighted_standardisation
from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision


class RidgeMoments(NamedTuple):
    """Weighted sufficient statistics of one or more splits (leading axis S), on globally centered data.

    ``n [S]`` total weight, ``sum_x [S, d]``, ``sum_y [S, T]``, ``gram [S, d, d] = Σ w x xᵀ``,
    ``cross [S, d, T] = Σ w x yᵀ``, ``sum_sq [S, d] = Σ w x²``, ``sum_yy [S] = Σ w ‖y‖²``; ``offset [d]`` the
    global mean that was subtracted from ``x`` before accumulating (keeps float32 Gram matrices free of
    cancellation).
    """

    n: jax.Array
    sum_x: jax.Array
    sum_y: jax.Array
    gram: jax.Array
    cross: jax.Array
    sum_sq: jax.Array
    sum_yy: jax.Array
    offset: jax.Array


@functools.partial(jax.jit, static_argnames=("precision",))
def ridge_moments(
    x: jax.Array, targets: jax.Array, weights: jax.Array, *, precision=DEFAULT_PRECISION
) -> RidgeMoments:
    """Moments of every split ``weights [S, N]`` over ``x [N, d]``, ``targets [N, T]``: costs S·N·d²."""
    precision = check_precision(precision)
    x = jnp.asarray(x, jnp.float32)
    support = jnp.max(weights, axis=0)
    offset = jnp.matmul(support, x, precision=precision) / jnp.sum(support)
    centered = x - offset
    weighted = weights[:, :, None] * centered  # [S, N, d]
    return RidgeMoments(
        n=jnp.sum(weights, axis=1),
        sum_x=jnp.sum(weighted, axis=1),
        sum_y=jnp.matmul(weights, targets, precision=precision),
        gram=jnp.einsum("snd,ne->sde", weighted, centered, precision=precision),
        cross=jnp.einsum("snd,nt->sdt", weighted, targets, precision=precision),
        sum_sq=jnp.einsum("snd,nd->sd", weighted, centered, precision=precision),
        sum_yy=jnp.matmul(weights, jnp.sum(jnp.square(targets), axis=1), precision=precision),
        offset=offset,
    )


def fold_moments(x_folds, targets_folds, mask, xp=jnp, *, precision=DEFAULT_PRECISION) -> RidgeMoments:
    """Each fold's moments (leading axis F) from data laid out by fold: ``x_folds [F, M, d]``, ``targets_folds
    [F, M, T]``, ``mask [F, M]`` marking real rows (folds are zero-padded to a common size ``M``).

    Centered on the global mean first (``offset``). ``xp`` is the array namespace: ``jax.numpy`` (under jit,
    any device) or ``numpy``, whose ``cᵀc`` is a BLAS ``syrk`` — half the flops of a general product, about
    twice XLA's CPU speed for these Gram matrices. ``precision`` applies to ``jax.numpy`` only.
    """
    precision = check_precision(precision)

    def matmul(a, b):
        return jnp.matmul(a, b, precision=precision) if xp is jnp else a @ b

    offset = matmul(mask.reshape(-1), x_folds.reshape(-1, x_folds.shape[-1])) / xp.sum(mask)
    centered = (x_folds - offset) * mask[:, :, None]  # padded rows: exact zeros
    if xp is jnp:  # materialised once: fused into the Gram product's operands, it halves XLA's matmul speed
        centered = jax.lax.optimization_barrier(centered)
    gram = xp.stack([matmul(fold.T, fold) for fold in centered])
    return RidgeMoments(
        n=xp.sum(mask, axis=1),
        sum_x=xp.sum(centered, axis=1),
        sum_y=xp.sum(mask[:, :, None] * targets_folds, axis=1),
        gram=gram,
        cross=matmul(xp.swapaxes(centered, 1, 2), targets_folds),
        sum_sq=xp.diagonal(gram, axis1=1, axis2=2),
        sum_yy=xp.sum(mask * xp.sum(xp.square(targets_folds), axis=2), axis=1),
        offset=offset,
    )


@functools.partial(jax.jit, static_argnames=("precision",))
def kfold_split_moments(per_fold: RidgeMoments, *, precision=DEFAULT_PRECISION) -> RidgeMoments:
    """The K-fold splits' moments from their folds': split ``s < F`` trains on every fold but ``s``, split
    ``F`` on all of them (the refit); a split's moments are the sum of its folds' (one tiny product)."""
    precision = check_precision(precision)
    n_folds = per_fold.n.shape[0]
    membership = jnp.concatenate([1.0 - jnp.eye(n_folds), jnp.ones((1, n_folds))])  # [F + 1, F]: split ∋ fold
    return per_fold._replace(
        **{k: jnp.tensordot(membership, jnp.asarray(v, jnp.float32), axes=1, precision=precision)
           for k, v in per_fold._asdict().items() if k != "offset"},
        offset=jnp.asarray(per_fold.offset, jnp.float32),
    )


@functools.partial(jax.jit, static_argnames=("precision",))
def kfold_ridge_moments(
    x_folds: jax.Array, targets_folds: jax.Array, mask: jax.Array, *, precision=DEFAULT_PRECISION
) -> RidgeMoments:
    """Moments of the K-fold splits (see :func:`kfold_split_moments`) from data laid out by fold (see
    :func:`fold_moments`). Each fold's Gram matrix is computed once, so all F+1 splits cost N·d² (not
    (F+1)·N·d²)."""
    x_folds, targets_folds, mask = (jnp.asarray(a, jnp.float32) for a in (x_folds, targets_folds, mask))
    per_fold = fold_moments(x_folds, targets_folds, mask, precision=precision)
    return kfold_split_moments(per_fold, precision=precision)


RIDGE_METHODS = ("pcg", "eigh")


class CenteredRidge(NamedTuple):
    """Each split's centered (and optionally standardised) normal equations, from its moments.

    ``gram [S, d, d] = D⁻¹(Σ w x xᵀ − n m mᵀ)D⁻¹``, ``cross [S, d, T] = D⁻¹(Σ w x yᵀ − n m ȳᵀ)``, weighted means
    ``mean_x [S, d]`` (raw features) and ``mean_y [S, T]``, ``scale [S, d]`` (``D = diag σ``, 1 unless
    standardising) and ``target_ss [S] = Σ w ‖y − ȳ‖²``.
    """

    gram: jax.Array
    cross: jax.Array
    mean_x: jax.Array
    mean_y: jax.Array
    scale: jax.Array
    target_ss: jax.Array


@functools.partial(jax.jit, static_argnames=("standardize",))
def centered_ridge(moments: RidgeMoments, standardize: bool) -> CenteredRidge:
    """Centers (and standardises) every split's normal equations; see :class:`CenteredRidge`."""
    n = moments.n[:, None]
    mean_x, mean_y = moments.sum_x / n, moments.sum_y / n
    if standardize:
        scale = jnp.sqrt(jnp.maximum(moments.sum_sq / n - jnp.square(mean_x), 0.0))
        scale = jnp.where(scale > 0, scale, 1.0)
    else:
        scale = jnp.ones_like(mean_x)
    gram = moments.gram - n[:, :, None] * mean_x[:, :, None] * mean_x[:, None, :]
    gram = gram / scale[:, :, None] / scale[:, None, :]
    cross = (moments.cross - n[:, :, None] * mean_x[:, :, None] * mean_y[:, None, :]) / scale[:, :, None]
    target_ss = moments.sum_yy - moments.n * jnp.sum(jnp.square(mean_y), axis=1)
    return CenteredRidge(gram, cross, mean_x + moments.offset, mean_y, scale, target_ss)


def _eigh_solutions(problem: CenteredRidge, alphas, precision):
    """Every split's own ``eigh``: ``W_s(α) = U_s diag(1/(e_s + α)) U_sᵀ B_s``. Residuals are taken as 0."""
    eigvals, eigvecs = jnp.linalg.eigh(problem.gram)
    rotated = jnp.einsum("sde,sdt->set", eigvecs, problem.cross, precision=precision)  # UᵀB
    shrunk = rotated[:, None] / (jnp.maximum(eigvals, 0.0)[:, None, :, None] + alphas[None, :, None, None])
    solution = jnp.einsum("sde,slet->sldt", eigvecs, shrunk, precision=precision)
    zeros = jnp.zeros(solution.shape[:2], jnp.float32)
    return solution, jnp.zeros_like(solution), zeros, zeros.astype(jnp.int32)


def _pcg_solutions(problem: CenteredRidge, weight_total, alphas, tol, max_iter: int, precision):
    """Preconditioned conjugate gradients for every split × α × target column at once.

    The last split (all of train in :func:`kfold_ridge_moments`) is the reference: ``A_r = U diag(e) Uᵀ`` is
    factorised once, and split ``s`` is preconditioned by ``P_s(α) = c_s A_r + αI``, ``c_s = n_s / n_r``
    (applied as ``U diag(1/(c_s e + α)) Uᵀ``). A K-fold split's Gram is ~``c_s A_r`` up to the fold's sampling
    fluctuation, so ``P_s⁻¹(A_s + αI)`` has a condition number near 2 for any α and CG reaches
    ``√(rᵀP⁻¹r / bᵀP⁻¹b) ≤ tol`` in a handful of iterations; on the reference split itself the start
    ``P_r⁻¹b`` is the eigendecomposition's solution and CG refines it past float32 ``eigh``'s accuracy.
    Returns ``(W, residual, relative preconditioned residual [S, L], iterations [S, L])``.
    """
    eigvals, eigvecs = jnp.linalg.eigh(problem.gram[-1])
    ratio = weight_total / weight_total[-1]
    # Vectors are laid out [S, L, T, d] (d last) so that every product below is one plain matrix multiply.
    inverse_spectrum = 1.0 / (ratio[:, None, None, None] * jnp.maximum(eigvals, 0.0) + alphas[None, :, None, None])

    def matmul(a, b):
        return jnp.matmul(a, b, precision=precision)

    def precondition(r):  # U diag(1/(c_s e + α)) Uᵀ r, for all splits in one product each way
        return matmul(matmul(r, eigvecs) * inverse_spectrum, eigvecs.T)

    def apply(w):  # (A_s + αI) w, as one [L·T, d] @ [d, d] product per split (XLA runs this einsum 2× slower)
        products = matmul(w.reshape(w.shape[0], -1, w.shape[-1]), problem.gram).reshape(w.shape)
        return products + alphas[None, :, None, None] * w

    def row_dot(a, b):
        return jnp.sum(a * b, axis=-1)  # [S, L, T]

    num_splits, dim, columns = problem.cross.shape
    rhs = jnp.broadcast_to(jnp.swapaxes(problem.cross, 1, 2)[:, None], (num_splits, alphas.shape[0], columns, dim))
    start = precondition(rhs)
    rhs_norm = jnp.maximum(row_dot(rhs, start), jnp.finfo(jnp.float32).tiny)
    residual = rhs - apply(start)
    direction = precondition(residual)
    rz = row_dot(residual, direction)

    def unfinished(rz):
        return rz > tol**2 * rhs_norm

    def step(state):
        i, w, r, p, rz, count = state
        active = unfinished(rz)
        q = apply(p)
        length = jnp.where(active, rz / jnp.where(active, row_dot(p, q), 1.0), 0.0)[..., None]
        w, r = w + length * p, r - length * q
        z = precondition(r)
        rz_new = jnp.where(active, row_dot(r, z), rz)
        momentum = jnp.where(active, rz_new / jnp.where(active, rz, 1.0), 0.0)[..., None]
        p = jnp.where(active[..., None], z + momentum * p, p)
        return i + 1, w, r, p, rz_new, count + jnp.any(active, axis=-1)

    def keep_going(state):
        return (state[0] < max_iter) & jnp.any(unfinished(state[4]))

    zeros = jnp.zeros(rz.shape[:2], jnp.int32)
    _, solution, residual, _, rz, iterations = jax.lax.while_loop(
        keep_going, step, (0, start, residual, direction, rz, zeros)
    )
    solution, residual = jnp.swapaxes(solution, 2, 3), jnp.swapaxes(residual, 2, 3)
    relative = jnp.sqrt(jnp.max(jnp.maximum(rz, 0.0) / rhs_norm, axis=-1))
    return solution, residual, relative, iterations


@functools.partial(jax.jit, static_argnames=("standardize", "method", "max_iter", "precision"))
def ridge_grid(
    moments: RidgeMoments,
    alphas: jax.Array,
    standardize: bool = False,
    method: str = "pcg",
    tol: float = 1e-5,
    max_iter: int = 50,
    *,
    precision=DEFAULT_PRECISION,
) -> LinearFits:
    """Ridge for every split × α from the splits' moments.

    Per split, with weighted means ``m, ȳ`` and ``A, B`` as in :class:`CenteredRidge`, the standardised
    weights are ``W(α) = (A + αI)⁻¹B``; then ``coef = D⁻¹W`` and ``intercept = ȳ − mᵀcoef``. ``method``:

    * ``"pcg"`` (default): one ``eigh`` of the last split's Gram and preconditioned CG for all splits, to a
      relative preconditioned residual ``tol`` (see :func:`_pcg_solutions`); ``grad_norm`` reports that
      residual (the objective's gradient is ``−2r``) and ``iterations`` the CG steps. It needs every split to
      resemble the last one (K-fold splits and their refit do); check ``grad_norm ≤ tol``.
    * ``"eigh"``: one ``eigh`` per split and every α for one rescale of its eigenvalues — exact in exact
      arithmetic for any splits (float32 ``eigh`` loses accuracy in ill-conditioned directions).

    Objective reported: ``Σ w‖y − xᵀcoef − b‖² + α‖W‖² = Σw‖y − ȳ‖² − tr(Wᵀ(B + r))`` with the residual
    ``r = B − (A + αI)W``. ``precision``: of every product (:mod:`sentcomp.kernels.precision`).
    """
    precision = check_precision(precision)
    if method not in RIDGE_METHODS:
        raise ValueError(f"method must be one of {RIDGE_METHODS}, got {method!r}")
    problem = centered_ridge(moments, standardize)
    alphas = jnp.asarray(alphas, jnp.float32)
    if method == "pcg":
        solution, residual, grad_norm, iterations = _pcg_solutions(problem, moments.n, alphas, tol, max_iter,
                                                                   precision)
    else:
        solution, residual, grad_norm, iterations = _eigh_solutions(problem, alphas, precision)
    coef = solution / problem.scale[:, None, :, None]
    intercept = problem.mean_y[:, None, :] - jnp.einsum("sd,sldt->slt", problem.mean_x, coef, precision=precision)
    explained = jnp.sum(solution * (problem.cross[:, None] + residual), axis=(2, 3))
    objective = problem.target_ss[:, None] - explained
    return LinearFits(coef, intercept, objective, grad_norm, iterations)


def _centered_kernel(kernel: jax.Array, weights: jax.Array, precision) -> jax.Array:
    """``ZZᵀ`` for ``Z = diag(√w)(X − 1mᵀ)``, ``m = Xᵀw̃``, ``w̃ = w/Σw``, from ``G = XXᵀ`` in O(N²):
    ``diag(√w)(G − (Gw̃)1ᵀ − 1(Gw̃)ᵀ + (w̃ᵀGw̃)11ᵀ)diag(√w)``."""
    normalised = weights / jnp.sum(weights)
    kernel_mean = jnp.matmul(kernel, normalised, precision=precision)
    root = jnp.sqrt(weights)
    centered = kernel - kernel_mean[:, None] - kernel_mean[None, :] + jnp.matmul(normalised, kernel_mean,
                                                                                 precision=precision)
    return root[:, None] * centered * root[None, :]


@functools.partial(jax.jit, static_argnames=("standardize", "precision"))
def ridge_grid_dual(
    x: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    alphas: jax.Array,
    standardize: bool = False,
    support: tuple[jax.Array, ...] | None = None,
    *,
    precision=DEFAULT_PRECISION,
) -> LinearFits:
    """Ridge for every split × α through the kernel matrix: the smaller factorisation when rows < features.

    Same problem and outputs as :func:`ridge_grid` (``x [N, d]``, ``targets [N, T]``, ``weights [S, N]``).
    Per split, with weighted means ``m, ȳ``, ``D = diag σ`` (1 unless standardising),
    ``Z = diag(√w)(X − 1mᵀ)D⁻¹`` and ``Y_c = diag(√w)(Y − 1ȳᵀ)``, the push-through identity gives
    ``W(α) = (ZᵀZ + αI)⁻¹ZᵀY_c = Zᵀ(ZZᵀ + αI)⁻¹Y_c``. One ``eigh`` ``ZZᵀ = U diag(e) Uᵀ`` per split (n³,
    against d³ for the Gram matrix), and every α is one rescale: ``W(α) = Zᵀ U diag(1/(e + α)) r``,
    ``r = UᵀY_c``, with ``objective = ‖Y_c − ZW‖² + α‖W‖² = α Σᵢ ‖rᵢ‖²/(eᵢ + α)``.

    ``support`` (optional): per split, the indices of the rows it may weigh (every row of nonzero weight;
    default all N). Each split's kernel matrix is then only ``n_s × n_s`` (a K-fold split: ((F−1)/F)³ of the
    ``eigh``). Without standardisation every split's ``ZZᵀ`` is gathered from one shared ``XXᵀ`` (N²·d
    once); with it, each split's own scaling costs n_s²·d. ``grad_norm`` and ``iterations`` are 0.
    ``precision``: of every product (:mod:`sentcomp.kernels.precision`).
    """
    precision = check_precision(precision)

    def matmul(a, b):
        return jnp.matmul(a, b, precision=precision)

    x = jnp.asarray(x, jnp.float32)
    targets, weights = jnp.asarray(targets, jnp.float32), jnp.asarray(weights, jnp.float32)
    alphas = jnp.asarray(alphas, jnp.float32)
    offset = jnp.mean(x, axis=0)  # split means are then small: no float32 cancellation in the kernel matrix
    centered = x - offset
    shared_kernel = None if standardize else matmul(centered, centered.T)
    # None: the split on all rows, nothing to gather
    split_rows: tuple[jax.Array | None, ...] = (None,) * weights.shape[0] if support is None else support

    def one_split(rows, split_weights):
        gather = (lambda a: a) if rows is None else (lambda a: a[rows])
        rows_x, rows_y, split_weights = gather(centered), gather(targets), gather(split_weights)
        mean, scale = weighted_standardisation(rows_x, split_weights, standardize, precision=precision)
        if shared_kernel is None:  # standardize: each split's own scaling
            scaled = rows_x / scale
            split_kernel = matmul(scaled, scaled.T)
        else:
            split_kernel = shared_kernel if rows is None else shared_kernel[rows[:, None], rows[None, :]]
        eigvals, eigvecs = jnp.linalg.eigh(_centered_kernel(split_kernel, split_weights, precision))
        eigvals = jnp.maximum(eigvals, 0.0)
        mean_y = matmul(split_weights, rows_y) / jnp.sum(split_weights)
        root = jnp.sqrt(split_weights)
        rotated = matmul(eigvecs.T, root[:, None] * (rows_y - mean_y))  # r = UᵀY_c  [n, T]
        shrinkage = 1.0 / (eigvals[None, :] + alphas[:, None])  # [L, n]
        weighted = root[None, :, None] * matmul(eigvecs, shrinkage[:, :, None] * rotated)  # diag(√w) U diag(.) r
        # Zᵀv = D⁻¹(X − 1mᵀ)ᵀ diag(√w) v without forming Z; coef = D⁻¹W
        projected = matmul(rows_x.T, weighted) - mean[None, :, None] * jnp.sum(weighted, axis=1)[:, None, :]
        coef = projected / scale[:, None] ** 2
        objective = alphas * jnp.sum(shrinkage * jnp.sum(jnp.square(rotated), axis=1)[None, :], axis=1)
        return coef, mean_y[None] - matmul(mean + offset, coef), objective

    coef, intercept, objective = (jnp.stack(parts) for parts in zip(*map(one_split, split_rows, weights)))
    zeros = jnp.zeros(objective.shape, jnp.float32)
    return LinearFits(coef, intercept, objective, zeros, zeros.astype(jnp.int32))
