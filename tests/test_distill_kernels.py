"""Distillation kernels (sentcomp/kernels/distill.py) against float64 numpy references built V-wide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import kernels

N, D, V, K, D_TEACHER = 7, 5, 37, 6, 4
CHUNK = 8  # < V: several streamed chunks, the last one shifted


def _case(seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D)).astype(np.float32)
    phi = (rng.normal(size=(V, D)) / np.sqrt(D)).astype(np.float32)
    teacher_logits = scale * rng.normal(size=(N, V))
    p_teacher = np.exp(teacher_logits - teacher_logits.max(1, keepdims=True))
    p_teacher /= p_teacher.sum(1, keepdims=True)
    ids = np.argsort(-p_teacher, axis=1)[:, :K].astype(np.int32)
    probs = np.take_along_axis(p_teacher, ids, axis=1).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    return h, phi, p_teacher, ids, probs, mask


def _dense_sparse_target(ids, probs, vocab=V):
    """p̃ in float64: the stored probabilities, the rest spread uniformly over the other V − k words."""
    probs = probs.astype(np.float64)
    rest = np.clip(1 - probs.sum(1), 0, None)
    dense = np.repeat((rest / (vocab - ids.shape[1]))[:, None], vocab, axis=1) if ids.shape[1] < vocab \
        else np.zeros((len(ids), vocab))
    np.put_along_axis(dense, ids.astype(np.int64), probs, axis=1)
    return dense


def _log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _reference_soft_xent(h, phi, target):
    """Per position H(p̃, p_f) and the gradients of its masked mean are computed by the caller."""
    return -(target * _log_softmax(h.astype(np.float64) @ phi.astype(np.float64).T)).sum(1)


def test_sparse_target_mean_and_entropy_match_the_dense_distribution():
    h, phi, _, ids, probs, _ = _case()
    dense = _dense_sparse_target(ids, probs)
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(kernels.sparse_target_mean(ids, probs, phi), dense @ phi.astype(np.float64),
                               rtol=1e-5, atol=1e-6)
    entropy = -(np.where(dense > 0, dense * np.log(np.where(dense > 0, dense, 1)), 0)).sum(1)
    np.testing.assert_allclose(kernels.sparse_target_entropy(probs, V), entropy, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [K, V])  # k = V: the stored target is p_T exactly
def test_soft_xent_value_and_gradients_against_numpy(k):
    h, phi, p_teacher, _, _, mask = _case()
    ids = np.argsort(-p_teacher, axis=1)[:, :k].astype(np.int32)
    probs = np.take_along_axis(p_teacher, ids, axis=1).astype(np.float32)
    target = _dense_sparse_target(ids, probs)
    if k == V:
        np.testing.assert_allclose(target, p_teacher, atol=1e-7)
    per_position = _reference_soft_xent(h, phi, target)
    np.testing.assert_allclose(kernels.soft_xent_per_position(h, phi, ids, probs, CHUNK), per_position, rtol=1e-5)
    weights = mask / mask.sum()
    value, (grad_h, grad_phi) = jax.value_and_grad(
        lambda h, phi: kernels.soft_xent_loss(h, phi, ids, probs, mask, CHUNK), argnums=(0, 1))(h, phi)
    np.testing.assert_allclose(value, (weights * per_position).sum(), rtol=1e-5)
    # ∂H/∂h = Φᵀ(p_f − p̃), ∂H/∂φ_w = (p_f(w) − p̃_w) h, each position weighted by 1/#counted
    p_f = np.exp(_log_softmax(h.astype(np.float64) @ phi.astype(np.float64).T))
    residual = weights[:, None] * (p_f - target)
    np.testing.assert_allclose(grad_h, residual @ phi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_phi, residual.T @ h, rtol=1e-4, atol=1e-6)


def test_soft_quad_value_and_gradients_against_numpy():
    h, phi, _, ids, probs, mask = _case(1)
    target = _dense_sparse_target(ids, probs)
    h64, phi64 = h.astype(np.float64), phi.astype(np.float64)
    logits = h64 @ phi64.T
    per_position = -(target * logits).sum(1) + 0.5 * (logits ** 2).sum(1)  # E_{w~p̃}[−hᵀφ_w] + ½‖Φᵀh‖²
    np.testing.assert_allclose(kernels.soft_quad_per_position(h, phi, ids, probs), per_position, rtol=1e-5,
                               atol=1e-5)
    weights = mask / mask.sum()
    value, (grad_h, grad_phi) = jax.value_and_grad(
        lambda h, phi: kernels.soft_quad_loss(h, phi, ids, probs, mask), argnums=(0, 1))(h, phi)
    np.testing.assert_allclose(value, (weights * per_position).sum(), rtol=1e-5)
    residual = weights[:, None] * (logits - target)  # ∂/∂logits of the per-position loss
    np.testing.assert_allclose(grad_h, residual @ phi64, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_phi, residual.T @ h64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["soft_xent_loss", "soft_quad_loss"])
def test_masked_positions_reach_neither_loss_nor_gradients(loss):
    h, phi, _, ids, probs, mask = _case(2)
    dirty_h, dirty_ids, dirty_probs = h.copy(), ids.copy(), probs.copy()
    dirty_h[~mask], dirty_ids[~mask], dirty_probs[~mask] = np.nan, 10_000, np.inf
    fn = getattr(kernels, loss)
    clean = jax.value_and_grad(lambda h, phi: fn(h, phi, ids, probs, mask), argnums=(0, 1))(h, phi)
    dirty = jax.value_and_grad(lambda h, phi: fn(h, phi, dirty_ids, dirty_probs, mask), argnums=(0, 1))(dirty_h, phi)
    np.testing.assert_allclose(dirty[0], clean[0], rtol=1e-6)
    assert np.all(np.asarray(dirty[1][0])[~mask] == 0)
    np.testing.assert_allclose(dirty[1][1], clean[1][1], rtol=1e-6, atol=1e-8)
    assert float(fn(h, phi, ids, probs, np.zeros_like(mask))) == 0.0


def test_top_k_targets_truncation_kl_and_the_loss_error_bound():
    _, phi, p_teacher, _, _, _ = _case(3, scale=1.0)
    logits = np.log(p_teacher).astype(np.float32)
    rng = np.random.default_rng(4)
    h = rng.normal(size=(N, D)).astype(np.float32)
    for k in (1, K, V - 1, V):
        ids, probs, truncation_kl, entropy = kernels.top_k_targets(logits, k)
        ids, probs = np.asarray(ids), np.asarray(probs)
        np.testing.assert_array_equal(np.sort(ids, 1), np.sort(np.argsort(-p_teacher, 1)[:, :k], 1))
        approx = _dense_sparse_target(ids, probs)
        kl = (p_teacher * (np.log(p_teacher) - np.log(approx))).sum(1)
        np.testing.assert_allclose(truncation_kl, kl, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(entropy, -(p_teacher * np.log(p_teacher)).sum(1), rtol=1e-5)
        # the loss error a truncated target causes is within r · (range of −log p_f over the tail)
        nll = -_log_softmax(h.astype(np.float64) @ phi.astype(np.float64).T)
        error = np.abs((p_teacher * nll).sum(1) - (approx * nll).sum(1))
        tail = np.ones_like(p_teacher, bool)
        np.put_along_axis(tail, ids.astype(np.int64), False, axis=1)
        spread = np.array([np.ptp(row[mask]) if mask.any() else 0.0 for row, mask in zip(nll, tail)])
        assert np.all(error <= (1 - probs.astype(np.float64).sum(1)) * spread + 1e-5)
    assert np.all(np.asarray(kernels.top_k_targets(logits, V)[2]) < 1e-6)
    with pytest.raises(ValueError, match="k must be"):
        kernels.top_k_targets(logits, V + 1)


def test_kl_from_features_is_the_direct_kl_of_a_tiny_teacher():
    rng = np.random.default_rng(5)
    h_teacher = 2 * rng.normal(size=(N, D_TEACHER)).astype(np.float32)
    phi_teacher = rng.normal(size=(V, D_TEACHER)).astype(np.float32)
    h, phi, *_ = _case(6)
    kl, mean = kernels.kl_from_features(h_teacher, phi_teacher, h, phi, CHUNK)
    log_p_teacher = _log_softmax(h_teacher.astype(np.float64) @ phi_teacher.astype(np.float64).T)
    log_p_f = _log_softmax(h.astype(np.float64) @ phi.astype(np.float64).T)
    direct = (np.exp(log_p_teacher) * (log_p_teacher - log_p_f)).sum(1)
    np.testing.assert_allclose(kl, direct, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(mean, np.exp(log_p_teacher) @ phi.astype(np.float64), rtol=1e-5, atol=1e-6)
    same, _ = kernels.kl_from_features(h, phi, h, phi, CHUNK)
    np.testing.assert_allclose(same, 0.0, atol=2e-5)
    with pytest.raises(ValueError, match="same vocabulary"):
        kernels.kl_from_features(h_teacher, phi_teacher[:-1], h, phi)


def test_quad_excess_is_the_soft_quad_loss_above_its_optimum():
    h, phi, p_teacher, *_ = _case(7)
    h64, phi64 = h.astype(np.float64), phi.astype(np.float64)
    target_mean = p_teacher @ phi64  # Φp
    optimum = np.linalg.solve(phi64.T @ phi64, target_mean.T).T  # f* = (ΦΦᵀ)⁻¹Φp in the paper's layout
    delta = (h64 - optimum) @ phi64.T
    np.testing.assert_allclose(kernels.quad_excess(h, phi, target_mean.astype(np.float32)),
                               0.5 * (delta ** 2).sum(1), rtol=1e-4, atol=1e-5)
    loss = lambda x: np.asarray(kernels.soft_quad_from_mean(x, phi, target_mean.astype(np.float32)))  # noqa: E731
    np.testing.assert_allclose(loss(h) - loss(optimum.astype(np.float32)), 0.5 * (delta ** 2).sum(1), rtol=1e-3,
                               atol=1e-4)


def test_bad_shapes_are_one_clear_error():
    h, phi, _, ids, probs, mask = _case()
    with pytest.raises(ValueError, match="soft_xent_loss expects"):
        kernels.soft_xent_loss(h, phi, ids[:, :2], probs, mask)
    with pytest.raises(ValueError, match="soft_quad_loss expects"):
        kernels.soft_quad_loss(h, phi[:, :2], ids, probs, mask)
    assert jnp.isfinite(kernels.soft_xent_loss(h, phi, ids, probs, mask))


@pytest.mark.parametrize("objective", ["soft_xent", "soft_quad"])
def test_only_the_cross_entropy_objective_computes_word_logits(objective):
    """What the training FLOPs (and so the MFU) count (sentcomp.training.steps.computes_word_logits): the soft
    cross-entropy's program and gradient have per-position V-wide products (the logits ``[N, V]``), the soft
    Quad's have none (its V-wide products are the Gram ``ΦᵀΦ`` and its gradient: once per step, not per position)."""
    from sentcomp.programs import distill
    from sentcomp.training import steps

    h, phi, _, ids, probs, mask = _case()
    loss = distill.SOFT_LOSSES[objective]
    text = jax.jit(jax.grad(lambda h, phi: loss(h, phi, ids, probs, mask), argnums=(0, 1))).lower(h, phi).as_text()
    dots = [line.split("->")[-1] for line in text.splitlines() if "stablehlo.dot_general" in line]
    v_wide = [result for result in dots if f"<{N}x{V}x" in result or f"<{N}x{V}>" in result]
    assert dots and bool(v_wide) == steps.computes_word_logits(objective), (objective, dots)
