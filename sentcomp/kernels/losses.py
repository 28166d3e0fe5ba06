"""Pretraining losses over token positions: cross-entropy and the paper's Quad objective, masked.

``h [..., d]`` are the features at each position, ``phi [V, d]`` the output embeddings, ``targets [...]`` the
next-word ids and ``mask [...]`` marks the positions that count (padding is False). Both losses return the
mean over counted positions, and 0 (not NaN) when no position counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sentcomp.kernels.features import DEFAULT_VOCAB_CHUNK, log_partition


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ mask·values / max(Σ mask, 1)``: the mean over counted positions, 0 if there are none."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def target_logits(h: jax.Array, phi: jax.Array, targets: jax.Array) -> jax.Array:
    """``f(s)ᵀφ_w`` for the observed next word ``w`` at every position: ``h.shape[:-1]``."""
    return jnp.einsum("...d,...d->...", h, jnp.take(phi, targets, axis=0), preferred_element_type=jnp.float32)


def xent_per_position(
    h: jax.Array, phi: jax.Array, targets: jax.Array, chunk_size: int = DEFAULT_VOCAB_CHUNK
) -> jax.Array:
    """``−log p_f(s)(w) = log Z(f(s)) − f(s)ᵀφ_w`` at every position, streamed over V (no [tokens, V] buffer)."""
    return log_partition(h, phi, chunk_size) - target_logits(h, phi, targets)


def quad_per_position(h: jax.Array, phi: jax.Array, targets: jax.Array) -> jax.Array:
    """``−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²`` at every position, via the Gram trick ``½‖Φᵀh‖² = ½ hᵀ G h``, ``G = ΦᵀΦ``.

    ``G = Σ_w φ_w φ_wᵀ`` is d×d and costs V·d² once; the quadratic term then costs d² per position instead of
    the V·d of materialised logits.
    """
    gram = jnp.dot(phi.T, phi, preferred_element_type=jnp.float32)
    quadratic = 0.5 * jnp.einsum("...d,de,...e->...", h, gram, h, preferred_element_type=jnp.float32)
    return quadratic - target_logits(h, phi, targets)


def xent_loss(
    h: jax.Array,
    phi: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> jax.Array:
    """Cross-entropy ``ℓ_xent(f, Φ) = E_{(s,w)}[−log p_f(s)(w)]`` averaged over the masked positions."""
    return masked_mean(xent_per_position(h, phi, targets, chunk_size), mask)


def quad_loss(h: jax.Array, phi: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Quad ``ℓ_quad(f, Φ) = E_{(s,w)}[−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²]`` averaged over the masked positions."""
    return masked_mean(quad_per_position(h, phi, targets), mask)
