"""Pretraining losses over token positions: cross-entropy and the paper's Quad objective, masked.

``h [..., d]`` are the features at each position, ``phi [V, d]`` the output embeddings, ``targets [...]`` the
next-word ids and ``mask [...]`` marks the positions that count (padding is False). Both losses return the
mean over counted positions, and 0 (not NaN) when no position counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sentcomp.kernels.features import DEFAULT_VOCAB_CHUNK, log_partition


def _masked_weights(mask: jax.Array) -> jax.Array:
    """``mask / max(Σ mask, 1)``: each counted position's weight in the masked mean."""
    mask = mask.astype(jnp.float32)
    return mask / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ mask·values / max(Σ mask, 1)``: the mean over counted positions, 0 if there are none."""
    return jnp.sum(values * _masked_weights(mask))


def target_logits(h: jax.Array, phi: jax.Array, targets: jax.Array) -> jax.Array:
    """``f(s)ᵀφ_w`` for the observed next word ``w`` at every position: ``h.shape[:-1]``."""
    return jnp.einsum("...d,...d->...", h, jnp.take(phi, targets, axis=0), preferred_element_type=jnp.float32)


def xent_per_position(
    h: jax.Array, phi: jax.Array, targets: jax.Array, chunk_size: int = DEFAULT_VOCAB_CHUNK
) -> jax.Array:
    """``−log p_f(s)(w) = log Z(f(s)) − f(s)ᵀφ_w`` at every position, streamed over V (no [tokens, V] buffer)."""
    return log_partition(h, phi, chunk_size) - target_logits(h, phi, targets)


def _gram(phi: jax.Array) -> jax.Array:
    """``G = ΦᵀΦ = Σ_w φ_w φ_wᵀ`` (d×d; V·d² flops, once per call)."""
    return jnp.dot(phi.T, phi, preferred_element_type=jnp.float32)


def _quad_from_gram(h: jax.Array, phi: jax.Array, targets: jax.Array, gram: jax.Array) -> jax.Array:
    quadratic = 0.5 * jnp.einsum("...d,de,...e->...", h, gram, h, preferred_element_type=jnp.float32)
    return quadratic - target_logits(h, phi, targets)


def quad_per_position(h: jax.Array, phi: jax.Array, targets: jax.Array) -> jax.Array:
    """``−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²`` at every position, via the Gram trick ``½‖Φᵀh‖² = ½ hᵀ G h``, ``G = ΦᵀΦ``.

    ``G = Σ_w φ_w φ_wᵀ`` is d×d and costs V·d² once; the quadratic term then costs d² per position instead of
    the V·d of materialised logits.
    """
    return _quad_from_gram(h, phi, targets, _gram(phi))


def xent_loss(
    h: jax.Array,
    phi: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> jax.Array:
    """Cross-entropy ``ℓ_xent(f, Φ) = E_{(s,w)}[−log p_f(s)(w)]`` averaged over the masked positions."""
    return masked_mean(xent_per_position(h, phi, targets, chunk_size), mask)


@jax.custom_vjp
def quad_loss(h: jax.Array, phi: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Quad ``ℓ_quad(f, Φ) = E_{(s,w)}[−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²]`` averaged over the masked positions.

    Gradients (weights ``a_n`` = mask / count): ``∂/∂h_n = a_n (G h_n − φ_{w_n})`` and
    ``∂/∂Φ = Φ H − Σ_n a_n e_{w_n} h_nᵀ`` with ``H = Σ_n a_n h_n h_nᵀ`` (d×d), written straight into one
    [V, d] buffer: no V-wide logits, and no second [V, d] temporary.
    """
    return masked_mean(quad_per_position(h, phi, targets), mask)


def _quad_loss_fwd(h, phi, targets, mask):
    gram = _gram(phi)  # kept for the backward pass: G is computed once per step
    return masked_mean(_quad_from_gram(h, phi, targets, gram), mask), (h, phi, targets, mask, gram)


def _quad_loss_bwd(residuals, grad_loss):
    h, phi, targets, mask, gram = residuals
    weights = grad_loss * _masked_weights(mask)[..., None]  # [..., 1]
    target_rows = jnp.take(phi, targets, axis=0)
    grad_h = weights * (jnp.dot(h, gram, preferred_element_type=jnp.float32) - target_rows)
    flat_h, flat_weighted_h = h.reshape(-1, h.shape[-1]), (weights * h).reshape(-1, h.shape[-1])
    second_moment = jnp.dot(flat_weighted_h.T, flat_h, preferred_element_type=jnp.float32)  # H, d×d
    grad_phi = jnp.dot(phi, second_moment, preferred_element_type=jnp.float32)
    grad_phi = grad_phi.at[targets.reshape(-1)].add(-flat_weighted_h)
    return grad_h.astype(h.dtype), grad_phi.astype(phi.dtype), None, None


quad_loss.defvjp(_quad_loss_fwd, _quad_loss_bwd)
