"""Softmax-LM feature kernels, streamed over the vocabulary.

Notation (../shared/PAPER.md): features ``h = f(s)`` of shape ``[..., d]``; output word embeddings ``phi`` of
shape ``[V, d]`` (row ``w`` is ``φ_w``, as stored in GPT-2's ``wte``); logits ``l_w = hᵀφ_w``.

Every V-wide quantity is computed chunk by chunk with a running max (online log-sum-exp), so memory is
O(N·chunk + N·d) for N feature vectors, never O(N·V), and no logit overflows however large it is.

Every product runs at ``precision`` (default ``"highest"``: full float32 on TPU and GPU too; see
:mod:`sentcomp.kernels.precision`).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sentcomp.kernels.precision import DEFAULT_PRECISION, check_precision

DEFAULT_VOCAB_CHUNK = 2048
# Callers that stream few rows at a time (a batch's last positions, zero-shot's scored positions) take the whole
# vocabulary as one chunk when the [rows, V] float32 logits fit this (:func:`vocab_chunk_for`).
LOGITS_BUDGET_BYTES = 2**26


def vocab_chunk_for(rows: int, vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """The vocabulary chunk for streaming ``rows`` feature vectors: all ``vocab_size`` words when their
    ``[rows, V]`` float32 logits fit ``budget_bytes``, else the most that do (never below
    :data:`DEFAULT_VOCAB_CHUNK`). Memory stays bounded by the rows, not by how many texts pass through, while a
    batch of a few dozen rows gets one product with Φ instead of a loop of narrow ones (the main job: 32 rows of
    SmolLM2, V = 49,152: 6 MiB of logits; docs/features.md, "Batches")."""
    return min(vocab_size, max(DEFAULT_VOCAB_CHUNK, budget_bytes // (4 * max(rows, 1))))


def as_jax_array(x: ArrayLike) -> jax.Array:
    """``x`` as a JAX array: a JAX array (or tracer) unchanged, anything else (numpy array, list, scalar) put on the
    default device by ``jax.device_put``, which copies it. ``jnp.asarray`` does the same but, in JAX 0.10, compiles
    an identity program (``jit(stage)``) for every new shape of a numpy array it is given."""
    return x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x))


def _num_chunks(vocab_size: int, chunk_size: int) -> tuple[int, int]:
    """``(chunk, n_chunks)``: the chunk length actually used (≤ V) and how many cover the vocabulary."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1 (vocabulary rows per streamed chunk), got {chunk_size}.")
    if vocab_size < 1:
        raise ValueError("The vocabulary is empty (phi has 0 rows): the log-partition needs at least one word.")
    chunk = min(chunk_size, vocab_size)
    return chunk, -(-vocab_size // chunk)


def _vocab_chunk(phi: jax.Array, index: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows ``[start, start + chunk)`` of ``phi`` for chunk ``index``, without copying or padding the table.

    The last chunk is shifted back to end at V (``start = min(index·chunk, V − chunk)``); rows it shares with
    the previous chunk are marked invalid so every word is counted once. Returns ``(start, rows, valid)``.
    """
    vocab_size = phi.shape[0]
    start = jnp.minimum(index * chunk, vocab_size - chunk)
    rows = jax.lax.dynamic_slice_in_dim(phi, start, chunk)
    valid = start + jnp.arange(chunk) >= index * chunk
    return start, rows, valid


def _chunk_logits(h: jax.Array, phi_chunk: jax.Array, valid: jax.Array, precision) -> jax.Array:
    """Logits ``h φ_wᵀ`` of one vocabulary chunk, ``-inf`` on padding rows: ``[N, chunk]``."""
    logits = jnp.dot(h, phi_chunk.T, precision=precision, preferred_element_type=jnp.float32)
    return jnp.where(valid, logits, -jnp.inf)


def _streamed_softmax_stats(h: jax.Array, phi: jax.Array, chunk_size: int, values: jax.Array | None, precision):
    """One pass over V computing ``log Z(h)`` and, if ``values [V, k]`` is given, ``Σ_w softmax(Φᵀh)_w v_w``.

    Online log-sum-exp: carry the running max ``m``, ``s = Σ exp(l_w − m)`` and ``acc = Σ exp(l_w − m) v_w``;
    when a chunk raises the max to ``m'`` the carried sums are rescaled by ``exp(m − m')``.
    ``h`` is ``[N, d]``; returns ``log_z [N]`` and ``mean [N, k]`` (or None).
    """
    chunk, n_chunks = _num_chunks(phi.shape[0], chunk_size)
    n = h.shape[0]

    def step(carry, index):
        start, phi_chunk, valid_chunk = _vocab_chunk(phi, index, chunk)
        running_max, sum_exp, acc = carry
        logits = _chunk_logits(h, phi_chunk, valid_chunk, precision)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        rescale = jnp.exp(running_max - new_max)
        weights = jnp.exp(logits - new_max[:, None])
        sum_exp = sum_exp * rescale + weights.sum(axis=-1)
        if values is not None:
            value_chunk = jax.lax.dynamic_slice_in_dim(values, start, chunk).astype(jnp.float32)
            acc = acc * rescale[:, None] + jnp.dot(weights, value_chunk, precision=precision)
        return (new_max, sum_exp, acc), None

    init = (
        jnp.full((n,), -jnp.inf, jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n, values.shape[1]) if values is not None else (0,), jnp.float32),
    )
    (running_max, sum_exp, acc), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
    log_z = running_max + jnp.log(sum_exp)
    mean = acc / sum_exp[:, None] if values is not None else None
    return log_z, mean


@contextlib.contextmanager
def reverse_mode_only(kernel: str):
    """Turns JAX's bare "can't apply forward-mode autodiff (jvp) to a custom_vjp function" into one that names
    ``kernel`` and says what to do."""
    try:
        yield
    except TypeError as error:
        if "forward-mode" not in str(error) and "supports reverse-mode" not in str(error):
            raise  # not JAX's forward-mode refusal (nor an inner kernel's rewording of it, renamed here)
        raise TypeError(
            f"{kernel} supports reverse-mode differentiation only (jax.grad, jax.vjp, jax.jacrev): its gradient is "
            "a custom VJP (jax.custom_vjp) that streams over V, which JAX cannot run in forward mode (jax.jvp, "
            "jax.jacfwd, jax.hessian). Use jax.jacrev instead of jax.jacfwd; in forward mode, the plain-jnp forms "
            "work: masked_mean(quad_per_position(h, phi, targets), mask) for the Quad loss, "
            "jax.nn.logsumexp(h @ phi.T, axis=-1) for log Z (V-wide)."
        ) from error


def _flatten_features(h: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    return h.reshape(-1, h.shape[-1]), h.shape[:-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _log_partition_flat(h: jax.Array, phi: jax.Array, chunk_size: int, precision) -> jax.Array:
    log_z, _ = _streamed_softmax_stats(h, phi, chunk_size, None, precision)
    return log_z


def _log_partition_fwd(h, phi, chunk_size, precision):
    log_z = _log_partition_flat(h, phi, chunk_size, precision)
    return log_z, (h, phi, log_z)


def _log_partition_bwd(chunk_size, precision, residuals, grad_log_z):
    """∂log Z/∂h = Σ_w p_w φ_w and ∂log Z/∂φ_w = p_w h, recomputed chunk by chunk from the saved log Z."""
    h, phi, log_z = residuals
    chunk, n_chunks = _num_chunks(phi.shape[0], chunk_size)

    def step(carry, index):
        grad_h, grad_phi = carry
        start, phi_chunk, valid_chunk = _vocab_chunk(phi, index, chunk)
        probs = jnp.exp(_chunk_logits(h, phi_chunk, valid_chunk, precision) - log_z[:, None])
        weighted = probs * grad_log_z[:, None]  # [N, chunk], zero on rows already counted
        grad_h = grad_h + jnp.dot(weighted, phi_chunk.astype(jnp.float32), precision=precision)
        rows = jax.lax.dynamic_slice_in_dim(grad_phi, start, chunk) + jnp.dot(
            weighted.T, h.astype(jnp.float32), precision=precision
        )
        return (grad_h, jax.lax.dynamic_update_slice_in_dim(grad_phi, rows, start, axis=0)), None

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(phi.shape, jnp.float32))
    (grad_h, grad_phi), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
    return grad_h.astype(h.dtype), grad_phi.astype(phi.dtype)


_log_partition_flat.defvjp(_log_partition_fwd, _log_partition_bwd)


def log_partition(
    h: ArrayLike, phi: ArrayLike, chunk_size: int = DEFAULT_VOCAB_CHUNK, *, precision=DEFAULT_PRECISION
) -> jax.Array:
    """``log Z(h) = log Σ_w exp(hᵀφ_w)``, shape ``h.shape[:-1]``, float32.

    Differentiable with a streamed backward pass (``∇_h log Z = Φ p_f``, ``∇_{φ_w} log Z = p_f(w) h``), so
    training through it never stores V-wide activations either. Reverse mode only: ``jax.jvp``/``jacfwd`` raise
    a ``TypeError`` saying so. ``precision``: of every product, forward and backward
    (:mod:`sentcomp.kernels.precision`).
    """
    with reverse_mode_only("log_partition"):
        return _log_partition(as_jax_array(h), as_jax_array(phi), chunk_size, check_precision(precision))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _log_partition(h: jax.Array, phi: jax.Array, chunk_size: int, precision) -> jax.Array:
    flat, batch_shape = _flatten_features(h)
    return _log_partition_flat(flat, phi, chunk_size, precision).reshape(batch_shape)


def conditional_mean_features(
    h: ArrayLike, phi: ArrayLike, chunk_size: int = DEFAULT_VOCAB_CHUNK, *, precision=DEFAULT_PRECISION
) -> jax.Array:
    """Conditional-mean features ``Φ p_f(s) = Σ_w softmax(Φᵀh)_w φ_w = ∇_h log Z(h)``, shape ``[..., d]``."""
    return expected_values(h, phi, phi, chunk_size, precision=precision)


def expected_values(
    h: ArrayLike, phi: ArrayLike, values: ArrayLike, chunk_size: int = DEFAULT_VOCAB_CHUNK, *,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """``E_{w ~ p_f(s)}[v_w] = Σ_w softmax(Φᵀh)_w v_w`` for a table ``values [V, k]`` (row ``v_w`` per word),
    shape ``[..., k]``, streamed over V with ``Φ``: ``values = Φ`` gives :func:`conditional_mean_features`,
    ``values = Aᵀ`` the projected distribution ``A p_f(s)`` of a ``k × V`` matrix ``A`` (the paper's random
    projection features), never materialising the ``[N, V]`` distribution."""
    h, phi, values = as_jax_array(h), as_jax_array(phi), as_jax_array(values)
    if values.shape[0] != phi.shape[0]:
        raise ValueError(f"values has {values.shape[0]} rows but the vocabulary has {phi.shape[0]} words.")
    return _expected_values(h, phi, values, chunk_size, check_precision(precision))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _expected_values(h: jax.Array, phi: jax.Array, values: jax.Array, chunk_size: int, precision) -> jax.Array:
    flat, batch_shape = _flatten_features(h)
    _, mean = _streamed_softmax_stats(flat, phi, chunk_size, values, precision)
    return mean.reshape(*batch_shape, values.shape[1])


@functools.partial(jax.jit, static_argnames=("precision",))
def word_logits(h: jax.Array, phi: jax.Array, word_ids: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """Logits ``hᵀφ_w`` of the words ``word_ids [k]`` only (the authors' subset-word features): ``[..., k]``."""
    words = jnp.take(phi, word_ids, axis=0).T
    return jnp.dot(h, words, precision=check_precision(precision), preferred_element_type=jnp.float32)


def word_log_probs(
    h: jax.Array, phi: jax.Array, word_ids: jax.Array, chunk_size: int = DEFAULT_VOCAB_CHUNK, *,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """Next-word log-probabilities ``log p_f(s)(w) = hᵀφ_w − log Z(h)`` of the words ``word_ids``: ``[..., k]``.
    Reverse-mode only (through :func:`log_partition`)."""
    with reverse_mode_only("word_log_probs"):
        return _word_log_probs(as_jax_array(h), as_jax_array(phi), as_jax_array(word_ids), chunk_size,
                               check_precision(precision))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _word_log_probs(h: jax.Array, phi: jax.Array, word_ids: jax.Array, chunk_size: int, precision) -> jax.Array:
    logits = word_logits(h, phi, word_ids, precision=precision)
    return logits - log_partition(h, phi, chunk_size, precision=precision)[..., None]


def word_probs(
    h: jax.Array, phi: jax.Array, word_ids: jax.Array, chunk_size: int = DEFAULT_VOCAB_CHUNK, *,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """Next-word probabilities ``p_f(s)(w)`` of the words ``word_ids``: ``[..., k]``. Reverse-mode only."""
    with reverse_mode_only("word_probs"):
        return _word_probs(as_jax_array(h), as_jax_array(phi), as_jax_array(word_ids), chunk_size,
                           check_precision(precision))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _word_probs(h: jax.Array, phi: jax.Array, word_ids: jax.Array, chunk_size: int, precision) -> jax.Array:
    return jnp.exp(_word_log_probs(h, phi, word_ids, chunk_size, precision))
