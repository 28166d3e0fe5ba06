"""Distillation against a teacher's next-word distribution ``p_T(.|s)``: soft cross-entropy, soft Quad, exact ε.

Notation (../shared/PAPER.md): student features ``h = f(s) [..., d]``, output embeddings ``phi [V, d]`` (row w is
``φ_w``), logits ``l_w = hᵀφ_w``, ``p_f = softmax(l)``, ``G = ΦᵀΦ = Σ_w φ_w φ_wᵀ`` (d×d in this layout).

**Sparse targets.** A teacher distribution is stored as its top-k words: ``ids [..., k]`` (distinct word ids)
and ``probs [..., k]`` (their probabilities), the remaining mass ``r = 1 − Σ_i probs_i`` spread **uniformly**
over the ``V − k`` other words (``u = r/(V − k)`` each). Call that distribution ``p̃``; with ``k = V`` it is
``p_T`` exactly. Everything below is exact for ``p̃``, and needs only sums over the k stored words plus the
column sum ``σ = Σ_w φ_w``, because a uniform tail contributes through ``Σ_{w∉top} φ_w = σ − Σ_i φ_{id_i}``:

* conditional mean ``Φp̃ = Σ_i probs_i φ_{id_i} + u (σ − Σ_i φ_{id_i})`` (:func:`sparse_target_mean`);
* soft cross-entropy ``H(p̃, p_f) = −Σ_w p̃_w log p_f(w) = log Z(h) − hᵀΦp̃`` (since ``Σ_w p̃_w = 1``), with
  ``log Z`` streamed over V (:func:`sentcomp.kernels.log_partition`: memory O(N·chunk), a streamed backward);
  gradient ``∂/∂h = Φp_f − Φp̃`` (:func:`soft_xent_per_position`, :func:`soft_xent_loss`);
* soft Quad ``ℓ_quad,s = −hᵀΦp̃ + ½‖Φᵀh‖² = −hᵀΦp̃ + ½hᵀGh`` (the Quad loss is linear in the target
  distribution, so this is ``E_{w~p̃}[−hᵀφ_w + ½‖Φᵀh‖²]``); no V-wide logits (:func:`soft_quad_loss`);
* entropy ``H(p̃) = −Σ_i probs_i log probs_i − r log u`` (:func:`sparse_target_entropy`), so
  ``KL(p̃ ‖ p_f) = H(p̃, p_f) − H(p̃) ≥ 0``.

Truncation: ``KL(p_T ‖ p̃) = Σ_{w∉top} p_T(w) log(p_T(w)/u)`` (:func:`top_k_targets` returns it per position).
The loss error it causes is bounded: with ``x_w = −log p_f(w)``, ``|H(p_T,p_f) − H(p̃,p_f)| = |Σ_{w∉top}
(p_T(w) − u) x_w| ≤ r · (max_{w∉top} x_w − min_{w∉top} x_w)`` (the differences sum to 0 and their absolute
values to at most 2r).

**Exact ε from features** (:func:`kl_from_features`): for a teacher ``p_T = softmax(Φ_T h_T)`` (its own
``phi_true [V, d_T]``) ``KL(p_T ‖ p_f) = E_{p_T}[l_T] − log Z_T − E_{p_T}[l_f] + log Z_f``, with
``E_{p_T}[l_T] = h_Tᵀ(Φ_T p_T)`` and ``E_{p_T}[l_f] = hᵀ(Φ p_T)``: one streamed pass over V
(:func:`sentcomp.kernels.expected_values`) with values ``[Φ_T | Φ]``, never an ``[N, V]`` buffer.

**Excess Quad loss** (:func:`quad_excess`): ``ℓ_quad,s(h) − min_θ ℓ_quad,s(θ) = ½‖Φᵀ(h − f*)‖²`` with
``f* = G⁻¹ Φp`` (the paper's ``(ΦΦᵀ)⁻¹Φp*``), computed as ``½(h − f*)ᵀG(h − f*)``.

Masks: ``mask [...]`` marks the positions that count (any non-zero value; not a weight). An uncounted position's
features, ids and probabilities are replaced by zeros before any product (``jnp.where``), so whatever it holds
(NaN, out-of-range ids) reaches neither the loss nor the gradients. Losses are means over counted positions, 0
when none counts. Every product runs at ``precision`` (default ``"highest"``, :mod:`sentcomp.kernels.precision`).
Memory: the sparse terms gather ``[N, k, d]`` rows; choose k accordingly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from sentcomp.kernels.losses import masked_mean
from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision
from sentcomp.kernels.softmax_features import (
    DEFAULT_VOCAB_CHUNK,
    as_jax_array,
    expected_values,
    log_partition,
    reverse_mode_only,
)


@jax.jit
def remaining_mass(probs: jax.Array) -> jax.Array:
    """``r = max(1 − Σ_i probs_i, 0)`` over the last axis: the mass the stored words leave to the tail."""
    return jnp.maximum(1.0 - jnp.sum(probs.astype(jnp.float32), axis=-1), 0.0)


def _tail_share(probs: jax.Array, vocab_size: int) -> jax.Array:
    """``u = r/(V − k)``, each tail word's probability (0 when the k stored words are the whole vocabulary)."""
    tail_words = vocab_size - probs.shape[-1]
    return remaining_mass(probs) / tail_words if tail_words > 0 else jnp.zeros(probs.shape[:-1], jnp.float32)


@functools.partial(jax.jit, static_argnames=("precision",))
def sparse_target_mean(ids: jax.Array, probs: jax.Array, phi: jax.Array, *, precision=DEFAULT_PRECISION
                       ) -> jax.Array:
    """``Φp̃ = Σ_i probs_i φ_{id_i} + u (σ − Σ_i φ_{id_i})``, ``σ = Σ_w φ_w``: ``[..., d]`` (module docstring)."""
    precision = check_precision(precision)
    rows = jnp.take(phi, ids, axis=0).astype(jnp.float32)  # [..., k, d]
    u = _tail_share(probs, phi.shape[0])
    top = jnp.einsum("...k,...kd->...d", probs.astype(jnp.float32), rows, precision=precision)
    tail = jnp.sum(phi.astype(jnp.float32), axis=0) - jnp.sum(rows, axis=-2)
    return top + u[..., None] * tail


@functools.partial(jax.jit, static_argnames=("vocab_size",))
def sparse_target_entropy(probs: jax.Array, vocab_size: int) -> jax.Array:
    """``H(p̃) = −Σ_i probs_i log probs_i − r log u`` per position (``0 log 0 = 0``)."""
    probs = probs.astype(jnp.float32)
    top = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
    u, r = _tail_share(probs, vocab_size), remaining_mass(probs)
    return top - jnp.where(r > 0, r * jnp.log(jnp.where(u > 0, u, 1.0)), 0.0)


def _zero_uncounted(mask, *arrays):
    """Each of ``arrays`` (leading shape ``mask.shape``) with the uncounted positions replaced by 0."""
    counted = mask != 0
    return counted, [jnp.where(counted.reshape(counted.shape + (1,) * (a.ndim - counted.ndim)), a,
                               jnp.zeros((), a.dtype)) for a in arrays]


def _check_shapes(kernel: str, h, phi, ids, probs, mask) -> None:
    lead = jnp.shape(h)[:-1]
    if (jnp.ndim(phi) != 2 or jnp.shape(phi)[1] != jnp.shape(h)[-1] or jnp.shape(ids) != jnp.shape(probs)
            or jnp.shape(ids)[:-1] != lead or jnp.shape(mask) != lead or jnp.shape(ids)[-1] > jnp.shape(phi)[0]):
        raise ValueError(f"{kernel} expects h [..., d], phi [V, d], ids and probs [..., k] (k ≤ V) and mask [...] "
                         f"with the same leading shape; got h {jnp.shape(h)}, phi {jnp.shape(phi)}, ids "
                         f"{jnp.shape(ids)}, probs {jnp.shape(probs)}, mask {jnp.shape(mask)}.")


def soft_xent_per_position(h: jax.Array, phi: jax.Array, ids: jax.Array, probs: jax.Array,
                           chunk_size: int = DEFAULT_VOCAB_CHUNK, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """``H(p̃, p_f) = log Z(h) − hᵀΦp̃`` at every position (every position counted), streamed over V.
    Reverse-mode only (through :func:`sentcomp.kernels.log_partition`)."""
    with reverse_mode_only("soft_xent_per_position"):
        return _soft_xent_per_position(*map(as_jax_array, (h, phi, ids, probs)), chunk_size,
                                       check_precision(precision))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _soft_xent_per_position(h, phi, ids, probs, chunk_size: int, precision) -> jax.Array:
    mean = sparse_target_mean(ids, probs, phi, precision=precision)
    return log_partition(h, phi, chunk_size, precision=precision) - jnp.einsum(
        "...d,...d->...", h.astype(jnp.float32), mean, precision=precision)


def soft_xent_loss(h: jax.Array, phi: jax.Array, ids: jax.Array, probs: jax.Array, mask: jax.Array,
                   chunk_size: int = DEFAULT_VOCAB_CHUNK, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """Soft cross-entropy ``E_s[H(p̃(.|s), p_f(s))]`` over the counted positions; ``∂/∂h = a_n(Φp_f − Φp̃)``
    (``a_n`` = 1/#counted). Reverse-mode only (through :func:`sentcomp.kernels.log_partition`)."""
    _check_shapes("soft_xent_loss", h, phi, ids, probs, mask)
    with reverse_mode_only("soft_xent_loss"):
        return _soft_xent_loss(*map(as_jax_array, (h, phi, ids, probs, mask)), chunk_size, check_precision(precision))


@functools.partial(jax.jit, static_argnums=(5, 6))
def _soft_xent_loss(h, phi, ids, probs, mask, chunk_size: int, precision) -> jax.Array:
    counted, (h, ids, probs) = _zero_uncounted(mask, h, ids, probs)
    return masked_mean(_soft_xent_per_position(h, phi, ids, probs, chunk_size, precision), counted)


@functools.partial(jax.jit, static_argnames=("precision",))
def soft_quad_from_mean(h: jax.Array, phi: jax.Array, target_mean: jax.Array, *, precision=DEFAULT_PRECISION
                        ) -> jax.Array:
    """``−hᵀm + ½hᵀGh`` per position for a target conditional mean ``m = Φp`` ``[..., d]``: the soft Quad loss."""
    precision = check_precision(precision)
    gram = jnp.dot(phi.T, phi, precision=precision, preferred_element_type=jnp.float32)
    h = h.astype(jnp.float32)
    return (0.5 * jnp.einsum("...d,de,...e->...", h, gram, h, precision=precision)
            - jnp.einsum("...d,...d->...", h, target_mean, precision=precision))


@functools.partial(jax.jit, static_argnames=("precision",))
def soft_quad_per_position(h: jax.Array, phi: jax.Array, ids: jax.Array, probs: jax.Array, *,
                           precision=DEFAULT_PRECISION) -> jax.Array:
    """Soft Quad ``−hᵀΦp̃ + ½‖Φᵀh‖²`` at every position (Gram trick: no V-wide logits; plain jnp)."""
    return soft_quad_from_mean(h, phi, sparse_target_mean(ids, probs, phi, precision=precision),
                               precision=precision)


def soft_quad_loss(h: jax.Array, phi: jax.Array, ids: jax.Array, probs: jax.Array, mask: jax.Array, *,
                   precision=DEFAULT_PRECISION) -> jax.Array:
    """Soft Quad ``E_s[−f(s)ᵀΦp̃ + ½‖Φᵀf(s)‖²]`` over the counted positions; ``∂/∂h = a_n(Gh − Φp̃)``."""
    _check_shapes("soft_quad_loss", h, phi, ids, probs, mask)
    return _soft_quad_loss(*map(as_jax_array, (h, phi, ids, probs, mask)), check_precision(precision))


@functools.partial(jax.jit, static_argnums=5)
def _soft_quad_loss(h, phi, ids, probs, mask, precision) -> jax.Array:
    counted, (h, ids, probs) = _zero_uncounted(mask, h, ids, probs)
    return masked_mean(soft_quad_per_position(h, phi, ids, probs, precision=precision), counted)


@functools.partial(jax.jit, static_argnames=("precision",))
def quad_excess(h: jax.Array, phi: jax.Array, target_mean: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """``½‖Φᵀ(h − f*)‖² = ½(h − f*)ᵀG(h − f*)``, ``f* = G⁻¹ target_mean`` (``target_mean = Φp``): ``h.shape[:-1]``."""
    precision = check_precision(precision)
    gram = jnp.dot(phi.T, phi, precision=precision, preferred_element_type=jnp.float32)
    flat = target_mean.reshape(-1, target_mean.shape[-1]).astype(jnp.float32)
    optimum = jnp.linalg.solve(gram, flat.T).T.reshape(target_mean.shape)
    delta = h.astype(jnp.float32) - optimum
    return 0.5 * jnp.einsum("...d,de,...e->...", delta, gram, delta, precision=precision)


def kl_from_features(h_true: ArrayLike, phi_true: ArrayLike, h: ArrayLike, phi: ArrayLike,
                     chunk_size: int = DEFAULT_VOCAB_CHUNK, *, precision=DEFAULT_PRECISION
                     ) -> tuple[jax.Array, jax.Array]:
    """``(KL(p_T ‖ p_f), Φp_T)`` per position, ``p_T = softmax(Φ_T h_true)``, ``p_f = softmax(Φ h)``.

    ``h_true [..., d_T]`` with ``phi_true [V, d_T]`` (the teacher), ``h [..., d]`` with ``phi [V, d]`` (the
    student), same V. ``KL = h_trueᵀ(Φ_T p_T) − log Z_T − hᵀ(Φp_T) + log Z_f``, streamed over V (module
    docstring); also returns the student-side conditional mean ``Φp_T [..., d]`` (the Quad target). Not for
    training (no custom backward); use it for measurement.
    """
    h_true, phi_true, h, phi = map(as_jax_array, (h_true, phi_true, h, phi))
    if phi_true.shape[0] != phi.shape[0]:
        raise ValueError(f"kl_from_features: the teacher has {phi_true.shape[0]} words, the student {phi.shape[0]}; "
                         "both must use the same vocabulary.")
    return _kl_from_features(h_true, phi_true, h, phi, chunk_size, check_precision(precision))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _kl_from_features(h_true, phi_true, h, phi, chunk_size: int, precision) -> tuple[jax.Array, jax.Array]:
    d_true = phi_true.shape[1]
    means = expected_values(h_true, phi_true, jnp.concatenate([phi_true, phi], axis=1).astype(jnp.float32),
                            chunk_size, precision=precision)
    mean_true, mean = means[..., :d_true], means[..., d_true:]
    dot = lambda a, b: jnp.einsum("...d,...d->...", a.astype(jnp.float32), b, precision=precision)  # noqa: E731
    kl = (dot(h_true, mean_true) - log_partition(h_true, phi_true, chunk_size, precision=precision)
          - dot(h, mean) + log_partition(h, phi, chunk_size, precision=precision))
    return kl, mean


def top_k_targets(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The sparse target of ``p = softmax(logits)`` (``logits [..., V]``, V-wide: call it on batches of rows):
    ``(ids [..., k], probs [..., k], truncation_kl [...], entropy [...])`` with ``truncation_kl = KL(p ‖ p̃)``
    (``p̃`` = top-k + uniform tail, module docstring) and ``entropy = H(p)`` exactly."""
    vocab_size = logits.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, V = {vocab_size}], got {k}.")
    return _top_k_targets(as_jax_array(logits), k)


@functools.partial(jax.jit, static_argnums=1)
def _top_k_targets(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    vocab_size = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    top_log_p, ids = jax.lax.top_k(log_p, k)
    probs = jnp.exp(top_log_p)
    entropy = -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
    u = _tail_share(probs, vocab_size)
    in_top = jnp.zeros(logits.shape, bool)
    in_top = jnp.put_along_axis(in_top, ids, True, axis=-1, inplace=False)
    log_u = jnp.log(jnp.where(u > 0, u, 1.0))[..., None]
    tail_terms = jnp.where(in_top | (p <= 0), 0.0, p * (log_p - log_u))
    return ids.astype(jnp.int32), probs, jnp.maximum(jnp.sum(tail_terms, axis=-1), 0.0), entropy
