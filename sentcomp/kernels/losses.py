"""Pretraining losses over token positions: cross-entropy and the paper's Quad objective, masked.

``h [..., d]`` are the features at each position, ``phi [V, d]`` the output embeddings, ``targets [...]`` the
next-word ids and ``mask [...]`` marks the positions that count (padding is False). Both losses return the
mean over counted positions, and 0 (not NaN) when no position counts. Every product (the Gram matrix and the
custom backward passes included) runs at ``precision``, default ``"highest"`` (:mod:`sentcomp.kernels.precision`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sentcomp.kernels.features import DEFAULT_VOCAB_CHUNK, log_partition
from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision


def _masked_weights(mask: jax.Array) -> jax.Array:
    """``mask / max(Σ mask, 1)``: each counted position's weight in the masked mean."""
    mask = mask.astype(jnp.float32)
    return mask / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ mask·values / max(Σ mask, 1)``: the mean over counted positions, 0 if there are none."""
    return jnp.sum(values * _masked_weights(mask))


def target_logits(h: jax.Array, phi: jax.Array, targets: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """``f(s)ᵀφ_w`` for the observed next word ``w`` at every position: ``h.shape[:-1]``."""
    return jnp.einsum("...d,...d->...", h, jnp.take(phi, targets, axis=0), precision=check_precision(precision),
                      preferred_element_type=jnp.float32)


def xent_per_position(
    h: jax.Array, phi: jax.Array, targets: jax.Array, chunk_size: int = DEFAULT_VOCAB_CHUNK, *,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """``−log p_f(s)(w) = log Z(f(s)) − f(s)ᵀφ_w`` at every position, streamed over V (no [tokens, V] buffer)."""
    log_z = log_partition(h, phi, chunk_size, precision=precision)
    return log_z - target_logits(h, phi, targets, precision=precision)


def _gram(phi: jax.Array, precision) -> jax.Array:
    """``G = ΦᵀΦ = Σ_w φ_w φ_wᵀ`` (d×d; V·d² flops, once per call)."""
    return jnp.dot(phi.T, phi, precision=precision, preferred_element_type=jnp.float32)


def _quad_from_gram(h: jax.Array, phi: jax.Array, targets: jax.Array, gram: jax.Array, precision) -> jax.Array:
    quadratic = 0.5 * jnp.einsum("...d,de,...e->...", h, gram, h, precision=precision,
                                 preferred_element_type=jnp.float32)
    return quadratic - target_logits(h, phi, targets, precision=precision)


def quad_per_position(
    h: jax.Array, phi: jax.Array, targets: jax.Array, *, precision=DEFAULT_PRECISION
) -> jax.Array:
    """``−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²`` at every position, via the Gram trick ``½‖Φᵀh‖² = ½ hᵀ G h``, ``G = ΦᵀΦ``.

    ``G = Σ_w φ_w φ_wᵀ`` is d×d and costs V·d² once; the quadratic term then costs d² per position instead of
    the V·d of materialised logits.
    """
    precision = check_precision(precision)
    return _quad_from_gram(h, phi, targets, _gram(phi, precision), precision)


def xent_loss(
    h: jax.Array,
    phi: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
    *,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """Cross-entropy ``ℓ_xent(f, Φ) = E_{(s,w)}[−log p_f(s)(w)]`` averaged over the masked positions."""
    return masked_mean(xent_per_position(h, phi, targets, chunk_size, precision=precision), mask)


QUAD_ROW_BLOCK = 2048


def _num_row_blocks(n: int, block_size: int) -> int:
    """How many interleaved blocks the N positions are walked in: the smallest divisor k of N with N/k ≤
    ``block_size`` (1 when that would leave blocks under an eighth of ``block_size``, e.g. N prime)."""
    k = next(k for k in range(1, n + 1) if n % k == 0 and n // k <= block_size)
    return k if n // k >= block_size // 8 else 1


def _blocked(h, targets, mask, block_size):
    """Rows laid out ``[block, k, ...]``: block ``j`` is rows ``i·k + j``. The leading (batch-sharded) axis stays
    leading, so walking ``j`` slices an unsharded axis and data parallelism is kept."""
    flat_h = h.reshape(-1, h.shape[-1])
    k = _num_row_blocks(flat_h.shape[0], block_size)
    block = flat_h.shape[0] // k
    return (flat_h.reshape(block, k, -1), targets.reshape(block, k),
            _masked_weights(mask).reshape(block, k), k)


def _block(x: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)


def quad_loss(h: jax.Array, phi: jax.Array, targets: jax.Array, mask: jax.Array,
              block_size: int = QUAD_ROW_BLOCK, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """Quad ``ℓ_quad(f, Φ) = E_{(s,w)}[−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²]`` averaged over the masked positions.

    Gradients (weights ``a_n`` = mask / count): ``∂/∂h_n = a_n (G h_n − φ_{w_n})`` and
    ``∂/∂Φ = Φ H − Σ_n a_n e_{w_n} h_nᵀ`` with ``H = Σ_n a_n h_n h_nᵀ`` (d×d). Both passes walk the positions in
    blocks of at most ``block_size`` rows, so besides its inputs and outputs the loss needs only G, H and one
    block's d-wide rows: no V-wide logits and no extra [N, d] or [V, d] buffer. ``precision``: of every product,
    forward and backward (:mod:`sentcomp.kernels.precision`).
    """
    return _quad_loss(h, phi, targets, mask, block_size, check_precision(precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _quad_loss(h, phi, targets, mask, block_size, precision):
    return _quad_loss_fwd(h, phi, targets, mask, block_size, precision)[0]


def _quad_loss_fwd(h, phi, targets, mask, block_size, precision):
    rows, row_targets, weights, k = _blocked(h, targets, mask, block_size)
    gram = _gram(phi, precision)  # kept for the backward pass: G is computed once per step

    def step(carry, index):
        value, second_moment = carry
        block_rows, block_weights = _block(rows, index), _block(weights, index)
        quad = _quad_from_gram(block_rows, phi, _block(row_targets, index), gram, precision)
        value = value + jnp.sum(block_weights * quad)
        weighted = (block_weights[:, None] * block_rows).T
        moment = jnp.dot(weighted, block_rows, precision=precision, preferred_element_type=jnp.float32)
        return (value, second_moment + moment), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros(gram.shape, jnp.float32))
    (value, second_moment), _ = jax.lax.scan(step, init, jnp.arange(k))
    return value, (h, phi, targets, mask, gram, second_moment)


def _quad_loss_bwd(block_size, precision, residuals, grad_loss):
    h, phi, targets, mask, gram, second_moment = residuals
    rows, row_targets, weights, k = _blocked(h, targets, mask, block_size)

    def step(carry, index):
        grad_h, grad_phi = carry
        block_rows, block_targets = _block(rows, index), _block(row_targets, index)
        block_weights = grad_loss * _block(weights, index)[:, None]
        block_grad = block_weights * (jnp.dot(block_rows, gram, precision=precision, preferred_element_type=jnp.float32)
                                      - jnp.take(phi, block_targets, axis=0))
        grad_h = jax.lax.dynamic_update_index_in_dim(grad_h, block_grad, index, axis=1)
        return (grad_h, grad_phi.at[block_targets].add(-block_weights * block_rows)), None

    init = (jnp.zeros(rows.shape, jnp.float32),
            jnp.dot(phi, grad_loss * second_moment, precision=precision, preferred_element_type=jnp.float32))
    (grad_h, grad_phi), _ = jax.lax.scan(step, init, jnp.arange(k))
    return grad_h.reshape(h.shape).astype(h.dtype), grad_phi.astype(phi.dtype), None, None


_quad_loss.defvjp(_quad_loss_fwd, _quad_loss_bwd)
