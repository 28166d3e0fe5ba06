"""Least-squares fits of the paper's log-partition assumptions (../shared/PAPER.md), in pure jnp.

- Quadratic log-partition: ``log Z(θ) ≈ ½θᵀAθ + bᵀθ + c`` on the θ = f(s) a model produces. Linear in the
  unknowns through the features ``[½θ_i² (i), θ_iθ_j (i<j), θ, 1]``, so ``A`` (symmetric), ``b`` and ``c`` come
  from one (ridge) least-squares solve. For large d, ``basis`` (k orthonormal rows, e.g. the top principal
  directions of θ) restricts the quadratic part to ``A = Pᵀ A_k P`` (k(k+1)/2 unknowns instead of d(d+1)/2)
  while ``b`` stays full.
- Gaussian-embedding variant: if φ_w ~ N(μ, Σ), ``log Z(θ) ≈ log V + μᵀθ + ½θᵀΣθ``. :func:`fit_log_partition_fixed_a`
  fixes ``A = Cov(φ_w)`` and fits only ``b, c``; :func:`gaussian_log_partition` fits nothing.
- Affine map: ``Φp_f(s) = ∇ log Z(f(s)) ≈ A f(s) + b`` (:func:`fit_affine`).

Every solve standardises its feature columns first (θ from real LMs reaches norms in the hundreds, and
θ_iθ_j in the 10⁴s), then maps the coefficients back. ``ridge`` is the L2 penalty on the standardised
coefficients (0 gives ordinary least squares, the minimum-norm solution through an SVD, as ``lstsq``).
Every product runs at ``precision``, default ``"highest"`` (:mod:`sentcomp.kernels.precision`); so do the
fitted containers' ``__call__``. The public functions are jitted (``ridge`` and ``precision`` static): called
from Python, each is one compiled program.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision


class QuadraticFit(NamedTuple):
    """``log Z(θ) ≈ ½θᵀAθ + bᵀθ + c``: ``a [d, d]`` (symmetric), ``b [d]``, ``c []``."""

    a: jax.Array
    b: jax.Array
    c: jax.Array

    def __call__(self, theta: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
        return quadratic_form(self, theta, precision=precision)


@functools.partial(jax.jit, static_argnames=("precision",))
def quadratic_form(fit: QuadraticFit, theta: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """``½θᵀAθ + bᵀθ + c`` for ``theta [..., d]``."""
    precision = check_precision(precision)
    quadratic = jnp.einsum("...i,ij,...j->...", theta, fit.a, theta, precision=precision)
    return 0.5 * quadratic + jnp.matmul(theta, fit.b, precision=precision) + fit.c


def _min_norm_solve(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """``jnp.linalg.lstsq(a, b)[0]`` (minimum-norm least squares through an SVD, singular values below
    ``eps·max(N, D)·s_max`` dropped) with its two products at ``precision`` (``lstsq`` fixes them at HIGHEST)."""
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    rcond = float(jnp.finfo(a.dtype).eps) * max(a.shape)
    keep = (s > 0) & (s >= rcond * s[0])
    inverse = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
    rotated = jnp.matmul(u.T, b, precision=precision)
    scaled = (inverse if b.ndim == 1 else inverse[:, None]) * rotated
    return jnp.matmul(vt.T, scaled, precision=precision)


@functools.partial(jax.jit, static_argnames=("ridge", "precision"))
def least_squares(
    x: jax.Array, y: jax.Array, ridge: float = 0.0, *, precision=DEFAULT_PRECISION
) -> tuple[jax.Array, jax.Array]:
    """``min_{w, c} ‖x w + c − y‖² + ridge·‖w ⊙ std(x)‖²``: weights ``[D, ...]`` and intercept ``[...]``.

    ``x [N, D]``, ``y [N]`` or ``[N, m]``. Columns are centred and scaled to unit variance (constant columns
    are left at zero weight), solved by ``lstsq`` on the ridge-augmented system, and mapped back.
    """
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    x_scale = x.std(axis=0)
    x_scale = jnp.where(x_scale > 0, x_scale, 1.0)
    x_std = (x - x_mean) / x_scale
    y_centred = y - y_mean
    if ridge > 0:
        dim = x.shape[1]
        x_std = jnp.concatenate([x_std, jnp.sqrt(ridge) * jnp.eye(dim, dtype=x_std.dtype)])
        y_centred = jnp.concatenate([y_centred, jnp.zeros((dim, *y.shape[1:]), y_centred.dtype)])
    precision = check_precision(precision)
    weights_std = _min_norm_solve(x_std, y_centred, precision)
    weights = weights_std / (x_scale if weights_std.ndim == 1 else x_scale[:, None])
    return weights, y_mean - jnp.matmul(x_mean, weights, precision=precision)


def quadratic_features(u: jax.Array) -> jax.Array:
    """``[½u_i² for i] + [u_iu_j for i<j]`` in ``triu_indices`` order, ``[N, k(k+1)/2]``: ``½uᵀA_ku`` is linear in
    the upper triangle of ``A_k`` with these features."""
    rows, cols = jnp.triu_indices(u.shape[-1])
    products = u[..., rows] * u[..., cols]
    return jnp.where(rows == cols, 0.5, 1.0) * products


def _symmetric_from_upper(upper: jax.Array, k: int) -> jax.Array:
    rows, cols = jnp.triu_indices(k)
    a = jnp.zeros((k, k), upper.dtype).at[rows, cols].set(upper)
    return a + jnp.triu(a, 1).T


@functools.partial(jax.jit, static_argnames=("ridge", "precision"))
def fit_log_partition(
    theta: jax.Array, log_z: jax.Array, ridge: float = 0.0, basis: jax.Array | None = None, *,
    precision=DEFAULT_PRECISION,
) -> QuadraticFit:
    """Fits ``log Z(θ) ≈ ½θᵀAθ + bᵀθ + c`` to ``theta [N, d]``, ``log_z [N]``.

    With ``basis [k, d]`` (orthonormal rows P) the quadratic part is ``½(Pθ)ᵀA_k(Pθ)``, i.e. ``A = PᵀA_kP``.
    """
    precision = check_precision(precision)
    dim = theta.shape[-1]
    projected = theta if basis is None else jnp.matmul(theta, basis.T, precision=precision)
    k = projected.shape[-1]
    features = jnp.concatenate([quadratic_features(projected), theta], axis=-1)
    weights, c = least_squares(features, log_z, ridge, precision=precision)
    num_quadratic = k * (k + 1) // 2
    a = _symmetric_from_upper(weights[:num_quadratic], k)
    if basis is not None:
        a = jnp.matmul(jnp.matmul(basis.T, a, precision=precision), basis, precision=precision)
    return QuadraticFit(a=a, b=weights[num_quadratic:num_quadratic + dim], c=c)


@functools.partial(jax.jit, static_argnames=("precision",))
def embedding_covariance(phi: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """``Cov(φ_w)`` over the vocabulary (rows of ``phi [V, d]``), ``[d, d]`` (population covariance)."""
    centred = phi - phi.mean(axis=0)
    return jnp.matmul(centred.T, centred, precision=check_precision(precision)) / phi.shape[0]


@functools.partial(jax.jit, static_argnames=("ridge", "precision"))
def fit_log_partition_fixed_a(
    theta: jax.Array, log_z: jax.Array, a: jax.Array, ridge: float = 0.0, *, precision=DEFAULT_PRECISION
) -> QuadraticFit:
    """Fits only ``b, c`` in ``log Z(θ) ≈ ½θᵀAθ + bᵀθ + c`` with ``A`` given (e.g. ``embedding_covariance(phi)``)."""
    precision = check_precision(precision)
    residual = log_z - 0.5 * jnp.einsum("ni,ij,nj->n", theta, a, theta, precision=precision)
    b, c = least_squares(theta, residual, ridge, precision=precision)
    return QuadraticFit(a=a, b=b, c=c)


@functools.partial(jax.jit, static_argnames=("precision",))
def gaussian_log_partition(phi: jax.Array, *, precision=DEFAULT_PRECISION) -> QuadraticFit:
    """The zero-parameter Gaussian-embedding prediction ``log V + μᵀθ + ½θᵀΣθ`` (μ, Σ: mean and Cov of φ_w)."""
    covariance = embedding_covariance(phi, precision=precision)
    return QuadraticFit(a=covariance, b=phi.mean(axis=0), c=jnp.log(jnp.float32(phi.shape[0])))


class AffineFit(NamedTuple):
    """``y ≈ x Aᵀ + b``: ``a [m, d]``, ``b [m]``."""

    a: jax.Array
    b: jax.Array

    def __call__(self, x: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
        return jnp.matmul(x, self.a.T, precision=check_precision(precision)) + self.b


@functools.partial(jax.jit, static_argnames=("ridge", "precision"))
def fit_affine(x: jax.Array, y: jax.Array, ridge: float = 0.0, *, precision=DEFAULT_PRECISION) -> AffineFit:
    """Fits ``y ≈ A x + b`` (e.g. ``Φp_f(s) ≈ A f(s) + b``) to ``x [N, d]``, ``y [N, m]``."""
    weights, intercept = least_squares(x, y, ridge, precision=precision)
    return AffineFit(a=weights.T, b=intercept)


@jax.jit
def r_squared(y_true: jax.Array | np.ndarray, y_pred: jax.Array | np.ndarray) -> jax.Array:
    """``1 − Σ(y − ŷ)² / Σ(y − ȳ)²`` with ȳ the per-column mean over axis 0 (pooled over all columns)."""
    residual = jnp.sum(jnp.square(y_true - y_pred))
    total = jnp.sum(jnp.square(y_true - y_true.mean(axis=0)))
    return 1.0 - residual / total
