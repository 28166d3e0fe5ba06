"""Shared pieces of the linear-probe kernels (:mod:`~sentcomp.kernels.logistic`, :mod:`~sentcomp.kernels.ridge`):
the fits' container, weighted standardisation, scores and predicted labels.

Every number in the paper is the test accuracy of a linear probe on frozen features (../shared/PAPER.md,
"The paper's experimental protocol"). These kernels fit one probe per (split, regularisation) pair in a single
compiled call: a *split* is a row of sample weights over the same feature matrix (a cross-validation fold's
training part, or all of train), so shapes stay fixed and every fit shares one matrix product per iteration.

Standardisation (optional): features are mapped to ``(x − m_s)/σ_s`` with the weighted mean and standard
deviation of split ``s``'s own training rows, the penalty acts on the standardised weights, and the returned
coefficients are mapped back to raw features, so ``x @ coef + intercept`` always scores raw features.

Every product runs at ``precision``, default ``"highest"`` (:mod:`sentcomp.kernels.precision`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision

MULTI_CLASS_MODES = ("multinomial", "ovr")


class LinearFits(NamedTuple):
    """A grid of linear probes on raw features: ``scores = x @ coef[s, l] + intercept[s, l]``.

    ``coef [S, L, d, K']``, ``intercept [S, L, K']`` (``K' = 1`` for binary logistic regression).
    ``objective [S, L]``: the sklearn-form objective at the solution. ``grad_norm [S, L]``: the final gradient
    norm in the solver's preconditioned coordinates (0 for closed-form ridge). ``iterations [S, L]``.
    """

    coef: jax.Array
    intercept: jax.Array
    objective: jax.Array
    grad_norm: jax.Array
    iterations: jax.Array


@functools.partial(jax.jit, static_argnames=("standardize", "precision"))
def weighted_standardisation(x: jax.Array, weights: jax.Array, standardize: bool = True, *,
                             precision=DEFAULT_PRECISION):
    """Weighted mean ``m`` and standard deviation ``σ`` of the rows of ``x [N, d]`` (``σ = 1`` where it is 0).

    With ``standardize=False`` returns ``(m, 1)``: centering alone changes no linear probe, only conditioning.
    """
    precision = check_precision(precision)
    n = jnp.sum(weights)
    mean = jnp.matmul(weights, x, precision=precision) / n
    if not standardize:
        return mean, jnp.ones_like(mean)
    var = jnp.matmul(weights, jnp.square(x - mean), precision=precision) / n
    std = jnp.sqrt(var)
    return mean, jnp.where(std > 0, std, 1.0)


@functools.partial(jax.jit, static_argnames=("precision",))
def linear_scores(x: jax.Array, coef: jax.Array, intercept: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """``x [N, d] @ coef [..., d, K] + intercept [..., K]`` → scores ``[..., N, K]``."""
    scores = jnp.einsum("nd,...dk->...nk", x, coef, precision=check_precision(precision))
    return scores + intercept[..., None, :]


@jax.jit
def predict_labels(scores: jax.Array) -> jax.Array:
    """Class indices from scores ``[..., N, K']``: ``score > 0`` for one column (binary), else argmax."""
    if scores.shape[-1] == 1:
        return (scores[..., 0] > 0).astype(jnp.int32)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
