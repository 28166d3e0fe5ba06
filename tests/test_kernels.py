"""Feature and loss kernels against plain float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import kernels, parallel


def _np_log_softmax(logits):
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _random_problem(seed, batch_shape, vocab_size, dim, scale=1.0):
    rng = np.random.default_rng(seed)
    h = (rng.normal(size=(*batch_shape, dim)) * scale).astype(np.float32)
    phi = rng.normal(size=(vocab_size, dim)).astype(np.float32)
    return h, phi, rng


# (batch shape, V, d, chunk): V not divisible by the chunk, chunk larger than V, a single chunk.
SHAPES = [((3, 5), 1001, 16, 128), ((7,), 50, 8, 4096), ((2, 2, 3), 257, 4, 257)]


@pytest.mark.parametrize("batch_shape,vocab_size,dim,chunk", SHAPES)
def test_features_match_float64_reference(batch_shape, vocab_size, dim, chunk):
    h, phi, rng = _random_problem(0, batch_shape, vocab_size, dim, scale=0.7)
    log_p = _np_log_softmax(h.astype(np.float64) @ phi.T.astype(np.float64))
    word_ids = rng.choice(vocab_size, size=5, replace=False)

    log_z = np.log(np.exp(h.astype(np.float64) @ phi.T.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(kernels.log_partition(h, phi, chunk), log_z, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        kernels.conditional_mean_features(h, phi, chunk), np.exp(log_p) @ phi.astype(np.float64), atol=1e-5
    )
    np.testing.assert_allclose(kernels.word_logits(h, phi, word_ids), (h @ phi[word_ids].T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels.word_log_probs(h, phi, word_ids, chunk), log_p[..., word_ids], atol=1e-4)
    np.testing.assert_allclose(kernels.word_probs(h, phi, word_ids, chunk), np.exp(log_p[..., word_ids]), atol=1e-6)


def test_extreme_logits_do_not_overflow():
    """Logits of order 1e4 overflow a naive exp; the streamed log-sum-exp must stay exact."""
    h, phi, _ = _random_problem(1, (6,), 300, 8, scale=300.0)
    logits = h.astype(np.float64) @ phi.T.astype(np.float64)
    assert np.abs(logits).max() > 1e3
    log_p = _np_log_softmax(logits)
    log_z = kernels.log_partition(h, phi, 64)
    assert np.all(np.isfinite(log_z))
    np.testing.assert_allclose(log_z, logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)),
                               rtol=1e-6)
    mean = kernels.conditional_mean_features(h, phi, 64)
    np.testing.assert_allclose(mean, np.exp(log_p) @ phi.astype(np.float64), atol=1e-4)


def _np_losses(h, phi, targets, mask):
    h64, phi64 = h.astype(np.float64), phi.astype(np.float64)
    logits = h64 @ phi64.T
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    xent = -np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    quad = -picked + 0.5 * (logits**2).sum(-1)
    count = max(mask.sum(), 1)
    return (xent * mask).sum() / count, (quad * mask).sum() / count


@pytest.mark.parametrize("batch_shape,vocab_size,dim,chunk", SHAPES)
def test_losses_match_float64_reference(batch_shape, vocab_size, dim, chunk):
    h, phi, rng = _random_problem(2, batch_shape, vocab_size, dim, scale=0.5)
    targets = rng.integers(0, vocab_size, size=batch_shape)
    mask = rng.random(batch_shape) < 0.7
    xent, quad = _np_losses(h, phi, targets, mask)
    np.testing.assert_allclose(kernels.xent_loss(h, phi, targets, mask, chunk), xent, rtol=1e-5)
    np.testing.assert_allclose(kernels.quad_loss(h, phi, targets, mask), quad, rtol=1e-5)


def test_all_masked_batch_gives_zero_loss_and_zero_gradients():
    h, phi, rng = _random_problem(3, (2, 4), 40, 8)
    targets = rng.integers(0, 40, size=(2, 4))
    mask = np.zeros((2, 4), bool)
    for loss in (
        lambda h, p: kernels.xent_loss(h, p, targets, mask, 16),
        lambda h, p: kernels.quad_loss(h, p, targets, mask),
    ):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(h, phi)
        assert float(value) == 0.0
        for grad in grads:
            assert np.all(np.asarray(grad) == 0.0)


def _naive_xent(h, phi, targets, mask):
    log_p = jax.nn.log_softmax(h @ phi.T)
    per_position = -jnp.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    return jnp.sum(per_position * mask) / jnp.maximum(mask.sum(), 1)


def _naive_quad(h, phi, targets, mask):
    logits = h @ phi.T  # the paper code's materialised [tokens, V] form
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    per_position = -picked + 0.5 * jnp.sum(logits**2, -1)
    return jnp.sum(per_position * mask) / jnp.maximum(mask.sum(), 1)


@pytest.mark.parametrize("kernel,naive", [
    (lambda h, p, t, m: kernels.xent_loss(h, p, t, m, 96), _naive_xent),
    (kernels.quad_loss, _naive_quad),
    (lambda h, p, t, m: kernels.quad_loss(h, p, t, m, 4), _naive_quad),  # 6 interleaved row blocks of 3
])
def test_loss_gradients_match_naive_form(kernel, naive):
    with jax.default_matmul_precision("highest"):
        h, phi, rng = _random_problem(4, (3, 6), 500, 12, scale=0.4)
        targets = rng.integers(0, 500, size=(3, 6))
        mask = rng.random((3, 6)) < 0.6
        ours = jax.grad(kernel, argnums=(0, 1))(h, phi, targets, mask)
        reference = jax.grad(naive, argnums=(0, 1))(h, phi, targets, mask)
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_log_partition_gradient_is_conditional_mean():
    h, phi, _ = _random_problem(5, (9,), 333, 6)
    grad = jax.grad(lambda x: kernels.log_partition(x, phi, 50).sum())(h)
    np.testing.assert_allclose(grad, kernels.conditional_mean_features(h, phi, 50), atol=1e-6)


def test_kernels_vmap_and_jit():
    h, phi, rng = _random_problem(6, (4, 3), 100, 8)
    word_ids = jnp.asarray([1, 5, 7])
    direct = kernels.word_log_probs(h, phi, word_ids, 32)
    mapped = jax.jit(jax.vmap(lambda x: kernels.word_log_probs(x, phi, word_ids, 32)))(h)
    np.testing.assert_allclose(mapped, direct, atol=1e-6)


def test_sharded_batch_equals_single_device():
    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (XLA_FLAGS)"
    h, phi, rng = _random_problem(7, (16, 5), 700, 16, scale=0.5)
    targets = rng.integers(0, 700, size=(16, 5))
    mask = rng.random((16, 5)) < 0.8
    word_ids = jnp.asarray([3, 9, 11, 600])

    def everything(h, phi, targets, mask):
        return (
            kernels.conditional_mean_features(h, phi, 128),
            kernels.word_log_probs(h, phi, word_ids, 128),
            kernels.xent_loss(h, phi, targets, mask, 128),
            kernels.quad_loss(h, phi, targets, mask),
            jax.grad(kernels.xent_loss, argnums=(0, 1))(h, phi, targets, mask, 128),
            jax.grad(kernels.quad_loss, argnums=(0, 1))(h, phi, targets, mask, 16),  # 5 row blocks of 16
        )

    single = jax.jit(everything)(h, phi, targets, mask)
    mesh = parallel.data_mesh()
    sharded_inputs = (parallel.shard_batch(h, mesh), parallel.replicate(phi, mesh),
                      parallel.shard_batch(targets, mesh), parallel.shard_batch(mask, mesh))
    sharded = jax.jit(everything)(*sharded_inputs)
    assert sharded[0].sharding.spec[0] == parallel.DATA_AXIS
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
