"""Pretraining losses over token positions: cross-entropy and the paper's Quad objective, masked.

``h [..., d]`` are the features at each position, ``phi [V, d]`` the output embeddings, ``targets [...]`` the
next-word ids and ``mask [...]`` marks the positions that count (padding is False; any non-zero value counts,
it is not a weight). Both losses return the mean over counted positions, and 0 (not NaN) when no position
counts, the empty batch included. Every product (the Gram matrix and the custom backward passes included) runs
at ``precision``, default ``"highest"`` (:mod:`sentcomp.kernels.precision`).

Positions that do not count never reach the loss or its gradients, whatever they hold: a negative target id is
ignored like a masked position (``IGNORE_INDEX`` = −100, PyTorch's ``ignore_index``, or any id < 0), and the
features and target id of an ignored position are replaced by 0 (or, inside ``quad_loss``, the products of its
row selected away), so NaN/inf features or an out-of-range id there give no NaN, and their gradients are
exactly 0. A *counted* position with a target id
≥ V gives NaN (``jnp.take`` fills out-of-range rows with NaN): loud, not silent.

Differentiation: reverse mode only (``jax.grad``, ``jax.vjp``, ``jax.jacrev``). ``xent_loss`` (through
:func:`~sentcomp.kernels.log_partition`) and ``quad_loss`` have custom backward passes (``jax.custom_vjp``, so
training never stores V-wide activations or extra [N, d] buffers), which JAX cannot run in forward mode:
``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` raise a ``TypeError`` naming the kernel. For forward mode,
``masked_mean(quad_per_position(h, phi, targets), mask)`` is the Quad loss in plain differentiable jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision
from sentcomp.kernels.softmax_features import DEFAULT_VOCAB_CHUNK, as_jax_array, log_partition, reverse_mode_only

IGNORE_INDEX = -100  # any negative target id is ignored; this is PyTorch's convention


def counted_positions(targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Boolean ``[...]``: the positions that count, ``mask ≠ 0`` and a target id ≥ 0 (negative = ignored)."""
    return (mask != 0) & (targets >= 0)


def _zero_uncounted(h: jax.Array, targets: jax.Array, counted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``h`` and ``targets`` with every uncounted position set to 0 (a valid id, finite features), so nothing an
    ignored position holds reaches a product; ``jnp.where`` passes no gradient to the replaced entries."""
    return jnp.where(counted[..., None], h, jnp.zeros((), h.dtype)), jnp.where(counted, targets, 0)


def _masked_weights(mask: jax.Array) -> jax.Array:
    """``mask / max(Σ mask, 1)`` for a boolean mask: each counted position's weight in the masked mean."""
    mask = mask.astype(jnp.float32)
    return mask / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ_{mask ≠ 0} values / max(#counted, 1)``: the mean over counted positions, 0 if there are none.

    Uncounted values are selected away, not multiplied by 0, so a NaN or inf there does not leak into the mean.
    """
    return _masked_mean(as_jax_array(values), as_jax_array(mask))


@jax.jit
def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    counted = mask != 0
    return jnp.sum(jnp.where(counted, values, 0.0) * _masked_weights(counted))


def target_logits(h: jax.Array, phi: jax.Array, targets: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """``f(s)ᵀφ_w`` for the observed next word ``w`` at every position: ``h.shape[:-1]``."""
    return jnp.einsum("...d,...d->...", h, jnp.take(phi, targets, axis=0), precision=check_precision(precision),
                      preferred_element_type=jnp.float32)


def xent_per_position(
    h: jax.Array, phi: jax.Array, targets: jax.Array, chunk_size: int = DEFAULT_VOCAB_CHUNK, *,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """``−log p_f(s)(w) = log Z(f(s)) − f(s)ᵀφ_w`` at every position, streamed over V (no [tokens, V] buffer).

    A negative target id (``IGNORE_INDEX``) gives 0 there, with zero gradients, whatever ``h`` holds there.
    Reverse-mode only (see the module docstring)."""
    with reverse_mode_only("xent_per_position"):
        return _xent_per_position(as_jax_array(h), as_jax_array(phi), as_jax_array(targets), chunk_size,
                                  check_precision(precision))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _xent_per_position(h: jax.Array, phi: jax.Array, targets: jax.Array, chunk_size: int, precision) -> jax.Array:
    return _ignoring_negative_targets(
        lambda h, targets: _xent_values(h, phi, targets, chunk_size, precision), h, targets)


def _xent_values(h, phi, targets, chunk_size, precision) -> jax.Array:
    """``log Z(h) − hᵀφ_w`` at every position (every target id in range)."""
    return log_partition(h, phi, chunk_size, precision=precision) - target_logits(h, phi, targets,
                                                                                  precision=precision)


def _ignoring_negative_targets(per_position, h: jax.Array, targets: jax.Array) -> jax.Array:
    """``per_position(h, targets)`` with 0 (and no gradient) at positions whose target id is negative."""
    counted = targets >= 0
    return jnp.where(counted, per_position(*_zero_uncounted(h, targets, counted)), 0.0)


def _gram(phi: jax.Array, precision) -> jax.Array:
    """``G = ΦᵀΦ = Σ_w φ_w φ_wᵀ`` (d×d; V·d² flops, once per call)."""
    return jnp.dot(phi.T, phi, precision=precision, preferred_element_type=jnp.float32)


def _quad_from_gram(h: jax.Array, phi: jax.Array, targets: jax.Array, gram: jax.Array, precision) -> jax.Array:
    quadratic = 0.5 * jnp.einsum("...d,de,...e->...", h, gram, h, precision=precision,
                                 preferred_element_type=jnp.float32)
    return quadratic - target_logits(h, phi, targets, precision=precision)


def quad_per_position(
    h: ArrayLike, phi: ArrayLike, targets: ArrayLike, *, precision=DEFAULT_PRECISION
) -> jax.Array:
    """``−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²`` at every position, via the Gram trick ``½‖Φᵀh‖² = ½ hᵀ G h``, ``G = ΦᵀΦ``.

    ``G = Σ_w φ_w φ_wᵀ`` is d×d and costs V·d² once; the quadratic term then costs d² per position instead of
    the V·d of materialised logits. A negative target id (``IGNORE_INDEX``) gives 0 there, with zero gradients.
    Plain jnp: every mode of differentiation works (forward mode included).
    """
    return _quad_per_position(as_jax_array(h), as_jax_array(phi), as_jax_array(targets), check_precision(precision))


@functools.partial(jax.jit, static_argnums=3)
def _quad_per_position(h: jax.Array, phi: jax.Array, targets: jax.Array, precision) -> jax.Array:
    gram = _gram(phi, precision)
    return _ignoring_negative_targets(lambda h, targets: _quad_from_gram(h, phi, targets, gram, precision), h,
                                      targets)


def _check_shapes(kernel: str, h, phi, targets, mask) -> None:
    """``h [..., d]``, ``phi [V, d]``, ``targets`` and ``mask`` of shape ``h.shape[:-1]``, or a clear error."""
    h_shape, phi_shape = jnp.shape(h), jnp.shape(phi)
    if (len(phi_shape) != 2 or not h_shape or phi_shape[1] != h_shape[-1] or jnp.shape(targets) != h_shape[:-1]
            or jnp.shape(mask) != h_shape[:-1]):
        raise ValueError(f"{kernel} expects h [..., d], phi [V, d], targets [...] and mask [...] with the same "
                         f"leading shape; got h {h_shape}, phi {phi_shape}, targets {jnp.shape(targets)}, mask "
                         f"{jnp.shape(mask)}.")
    if phi_shape[0] < 1:
        raise ValueError(f"{kernel}: the vocabulary is empty (phi has shape {phi_shape}); it needs at least one word.")


def xent_loss(
    h: jax.Array,
    phi: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
    *,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """Cross-entropy ``ℓ_xent(f, Φ) = E_{(s,w)}[−log p_f(s)(w)]`` averaged over the counted positions (``mask``
    set, target id ≥ 0; nothing at the others reaches the loss or its gradients). Reverse-mode only (see the
    module docstring)."""
    _check_shapes("xent_loss", h, phi, targets, mask)
    with reverse_mode_only("xent_loss"):
        return _xent_loss(*map(as_jax_array, (h, phi, targets, mask)), chunk_size, check_precision(precision))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _xent_loss(h: jax.Array, phi: jax.Array, targets: jax.Array, mask: jax.Array, chunk_size: int,
               precision) -> jax.Array:
    counted = counted_positions(targets, mask)
    h, targets = _zero_uncounted(h, targets, counted)
    return masked_mean(_xent_values(h, phi, targets, chunk_size, precision), counted)


QUAD_ROW_BLOCK = 2048


def _num_row_blocks(n: int, block_size: int) -> int:
    """How many interleaved blocks the N positions are walked in: the smallest divisor k of N with N/k ≤
    ``block_size`` (1 when that would leave blocks under an eighth of ``block_size``, e.g. N prime; 1 for N = 0)."""
    k = next((k for k in range(1, n + 1) if n % k == 0 and n // k <= block_size), 1)
    return k if n // k >= block_size // 8 else 1


def _blocked(h, targets, mask, block_size):
    """Rows laid out ``[block, k, ...]``: block ``j`` is rows ``i·k + j``. The leading (batch-sharded) axis stays
    leading, so walking ``j`` slices an unsharded axis and data parallelism is kept."""
    flat_h = h.reshape(-1, h.shape[-1])
    k = _num_row_blocks(flat_h.shape[0], block_size)
    block = flat_h.shape[0] // k
    return (flat_h.reshape(block, k, h.shape[-1]), targets.reshape(block, k),
            _masked_weights(mask).reshape(block, k), k)


def _block(x: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)


def _counted(block_weights: jax.Array, values: jax.Array) -> jax.Array:
    """``values [rows, ...]`` where the row counts (weight > 0), 0 elsewhere: a NaN/inf an ignored row held, or
    produced, is selected away (multiplying by its weight 0 would keep it)."""
    return jnp.where(block_weights.reshape(-1, *[1] * (values.ndim - 1)) > 0, values, jnp.zeros((), values.dtype))


def quad_loss(h: jax.Array, phi: jax.Array, targets: jax.Array, mask: jax.Array,
              block_size: int = QUAD_ROW_BLOCK, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """Quad ``ℓ_quad(f, Φ) = E_{(s,w)}[−f(s)ᵀφ_w + ½‖Φᵀf(s)‖²]`` averaged over the counted positions (``mask``
    set, target id ≥ 0; nothing at the others reaches the loss or its gradients; 0 for an empty batch).

    Value ``½ Σ_ij G_ij H_ij − Σ_n a_n h_nᵀφ_{w_n}`` with ``H = Σ_n a_n h_n h_nᵀ`` (d×d; weights ``a_n`` =
    counted / count); gradients ``∂/∂h_n = a_n (G h_n − φ_{w_n})`` and ``∂/∂Φ = Φ H − Σ_n a_n e_{w_n} h_nᵀ``.
    Both passes walk the positions in
    blocks of at most ``block_size`` rows, so besides its inputs and outputs the loss needs only G, H and one
    block's d-wide rows: no V-wide logits and no extra [N, d] or [V, d] buffer. ``precision``: of every product,
    forward and backward (:mod:`sentcomp.kernels.precision`). Reverse-mode only: ``jax.jvp``/``jacfwd`` raise a
    ``TypeError`` (use ``masked_mean(quad_per_position(...), mask)`` for forward mode).
    """
    _check_shapes("quad_loss", h, phi, targets, mask)
    with reverse_mode_only("quad_loss"):
        return _counted_quad_loss(*map(as_jax_array, (h, phi, targets, mask)), block_size, check_precision(precision))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _counted_quad_loss(h: jax.Array, phi: jax.Array, targets: jax.Array, mask: jax.Array, block_size: int,
                       precision) -> jax.Array:
    counted = counted_positions(targets, mask)
    targets = jnp.where(counted, targets, 0)  # ignored rows of h are selected away block by block inside
    return _quad_loss(h, phi, targets, counted, block_size, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _quad_loss(h, phi, targets, mask, block_size, precision):
    return _quad_loss_fwd(h, phi, targets, mask, block_size, precision)[0]


def _quad_loss_fwd(h, phi, targets, mask, block_size, precision):
    rows, row_targets, weights, k = _blocked(h, targets, mask, block_size)
    gram = _gram(phi, precision)  # kept for the backward pass: G is computed once per step

    def step(carry, index):
        target_term, second_moment = carry
        block_weights = _block(weights, index)
        root = jnp.sqrt(block_weights)
        scaled = _counted(block_weights, root[:, None] * _block(rows, index))  # √a_n h_n, 0 if ignored
        target_term = target_term + jnp.sum(root * target_logits(scaled, phi, _block(row_targets, index),
                                                                 precision=precision))
        moment = jnp.dot(scaled.T, scaled, precision=precision, preferred_element_type=jnp.float32)
        return (target_term, second_moment + moment), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros(gram.shape, jnp.float32))
    (target_term, second_moment), _ = jax.lax.scan(step, init, jnp.arange(k))
    value = 0.5 * jnp.sum(gram * second_moment) - target_term  # ½ Σ_n a_n h_nᵀ G h_n = ½ tr(G H)
    return value, (h, phi, targets, mask, gram, second_moment)


def _quad_loss_bwd(block_size, precision, residuals, grad_loss):
    h, phi, targets, mask, gram, second_moment = residuals
    rows, row_targets, weights, k = _blocked(h, targets, mask, block_size)

    def step(carry, index):
        grad_h, grad_phi = carry
        block_rows, block_targets, block_weights = (_block(x, index) for x in (rows, row_targets, weights))
        scale = grad_loss * block_weights[:, None]
        block_grad = _counted(block_weights, scale * (
            jnp.dot(block_rows, gram, precision=precision, preferred_element_type=jnp.float32)
            - jnp.take(phi, block_targets, axis=0)))
        grad_h = jax.lax.dynamic_update_index_in_dim(grad_h, block_grad, index, axis=1)
        return (grad_h, grad_phi.at[block_targets].add(_counted(block_weights, -scale * block_rows))), None

    init = (jnp.zeros(rows.shape, jnp.float32),
            jnp.dot(phi, grad_loss * second_moment, precision=precision, preferred_element_type=jnp.float32))
    (grad_h, grad_phi), _ = jax.lax.scan(step, init, jnp.arange(k))
    return grad_h.reshape(h.shape).astype(h.dtype), grad_phi.astype(phi.dtype), None, None


_quad_loss.defvjp(_quad_loss_fwd, _quad_loss_bwd)
