"""Feature and loss kernels against plain float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import kernels, parallel
from sentcomp.kernels.losses import IGNORE_INDEX
from sentcomp.results import timings


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


def test_few_rows_take_the_whole_vocabulary_in_one_chunk_and_many_rows_stay_within_the_budget():
    budget = kernels.softmax_features.LOGITS_BUDGET_BYTES
    assert kernels.vocab_chunk_for(32, 49_152) == 49_152  # the main job's batch: 6 MiB of logits
    chunk = kernels.vocab_chunk_for(1000, 256_000)
    assert chunk < 256_000 and 1000 * chunk * 4 <= budget < 1000 * (chunk + 1) * 4
    assert kernels.vocab_chunk_for(2**22, 49_152) == kernels.softmax_features.DEFAULT_VOCAB_CHUNK  # the floor


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


@pytest.mark.parametrize("batch_shape,vocab_size,dim,chunk", SHAPES)
def test_losses_match_float64_reference(batch_shape, vocab_size, dim, chunk):
    h, phi, rng = _random_problem(2, batch_shape, vocab_size, dim, scale=0.5)
    targets = rng.integers(0, vocab_size, size=batch_shape)
    mask = rng.random(batch_shape) < 0.7
    np.testing.assert_allclose(kernels.xent_loss(h, phi, targets, mask, chunk),
                               _np_loss_and_grads("xent", h, phi, targets, mask)[0], rtol=1e-5)
    np.testing.assert_allclose(kernels.quad_loss(h, phi, targets, mask),
                               _np_loss_and_grads("quad", h, phi, targets, mask)[0], rtol=1e-5)


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


def _np_loss_and_grads(kind, h, phi, targets, counted):
    """Float64 numpy ``(loss, ∂/∂h, ∂/∂Φ)`` of the masked mean over the ``counted`` positions only, by the closed
    forms: xent ``∂/∂h_n = a_n(Φp_n − φ_{w_n})``, ``∂/∂Φ = Σ_n a_n(p_n − e_{w_n}) h_nᵀ``; Quad ``∂/∂h_n = a_n(G h_n −
    φ_{w_n})``, ``∂/∂Φ = Σ_n a_n(Φ h_n − e_{w_n}) h_nᵀ``, with ``a_n = 1/#counted`` (uncounted rows are never read)."""
    dim = h.shape[-1]
    rows, words = h.reshape(-1, dim)[counted.ravel()].astype(np.float64), targets.ravel()[counted.ravel()]
    phi64 = phi.astype(np.float64)
    logits = rows @ phi64.T
    a = 1.0 / max(len(rows), 1)
    one_hot = np.eye(len(phi))[words]
    if kind == "xent":
        probs = np.exp(_np_log_softmax(logits))
        values, residual = -np.log(probs[np.arange(len(rows)), words]), probs - one_hot
    else:
        values, residual = -logits[np.arange(len(rows)), words] + 0.5 * (logits**2).sum(-1), logits - one_hot
    grad_h = np.zeros((counted.size, dim))
    grad_h[counted.ravel()] = a * residual @ phi64
    return a * values.sum(), grad_h.reshape(h.shape), a * residual.T @ rows


LOSS_KERNELS = {
    "xent": lambda h, p, t, m: kernels.xent_loss(h, p, t, m, 96),
    "quad": kernels.quad_loss,
    "quad, 6 row blocks of 3": lambda h, p, t, m: kernels.quad_loss(h, p, t, m, 4),
}


@pytest.mark.parametrize("name", LOSS_KERNELS)
def test_loss_gradients_match_float64_closed_forms(name):
    h, phi, rng = _random_problem(4, (3, 6), 500, 12, scale=0.4)
    targets = rng.integers(0, 500, size=(3, 6))
    mask = rng.random((3, 6)) < 0.6
    value, grads = jax.value_and_grad(LOSS_KERNELS[name], argnums=(0, 1))(h, phi, targets, mask)
    want_value, *want_grads = _np_loss_and_grads(name[:4], h, phi, targets, mask)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_KERNELS)
def test_ignored_positions_never_reach_the_loss_or_its_gradients(name):
    """Masked positions holding NaN/inf features and out-of-range or negative target ids, and an unmasked
    position with the ignore index: the loss and gradients are those of the other positions alone (float64)."""
    vocab = 500
    h, phi, rng = _random_problem(8, (3, 6), vocab, 12, scale=0.4)
    targets = rng.integers(0, vocab, size=(3, 6))
    mask = np.ones((3, 6), bool)
    mask[0, 4:] = mask[2, 5] = False
    h[0, 4], h[0, 5], h[2, 5] = np.nan, np.inf, -1e30
    targets[0, 4], targets[0, 5], targets[2, 5] = vocab + 7, -1, -(10**6)
    targets[1, 2] = IGNORE_INDEX  # counted by the mask, ignored by its target id
    counted = mask & (targets >= 0)
    value, grads = jax.value_and_grad(LOSS_KERNELS[name], argnums=(0, 1))(h, phi, targets, mask)
    want_value, *want_grads = _np_loss_and_grads(name[:4], np.where(counted[..., None], h, 0), phi,
                                                 np.where(counted, targets, 0), counted)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grads[0])[~counted] == 0.0)


def test_per_position_losses_ignore_negative_targets():
    h, phi, rng = _random_problem(9, (2, 3), 40, 8)
    targets = rng.integers(0, 40, size=(2, 3))
    targets[1, 1] = IGNORE_INDEX
    h[1, 1] = np.nan
    for kind, kernel in (("xent", kernels.xent_per_position), ("quad", kernels.quad_per_position)):
        values, grad_h = jax.value_and_grad(lambda x: kernel(x, phi, targets).sum())(h)  # noqa: B023
        assert values == pytest.approx(_np_loss_and_grads(kind, h, phi, targets, targets >= 0)[0] * 5, rel=1e-5)
        assert np.all(np.asarray(grad_h[1, 1]) == 0.0) and np.all(np.isfinite(grad_h))


@pytest.mark.parametrize("name", LOSS_KERNELS)
def test_empty_batch_gives_zero_loss_and_empty_gradients(name):
    h, phi = np.zeros((0, 8), np.float32), np.ones((40, 8), np.float32)
    value, (grad_h, grad_phi) = jax.value_and_grad(LOSS_KERNELS[name], argnums=(0, 1))(
        h, phi, np.zeros(0, np.int32), np.zeros(0, bool))
    assert float(value) == 0.0 and grad_h.shape == (0, 8) and np.all(np.asarray(grad_phi) == 0.0)


def test_mismatched_shapes_are_a_clear_error():
    h, phi, _ = _random_problem(10, (2, 3), 40, 8)
    for loss in (kernels.xent_loss, kernels.quad_loss):
        with pytest.raises(ValueError, match=r"same leading shape; got h \(2, 3, 8\).*mask \(3,\)"):
            loss(h, phi, np.zeros((2, 3), np.int32), np.ones(3, bool))
        with pytest.raises(ValueError, match="phi \\(40, 7\\)"):
            loss(h, phi[:, :7], np.zeros((2, 3), np.int32), np.ones((2, 3), bool))


def test_forward_mode_is_a_clear_error_and_the_plain_quad_form_supports_it():
    h, phi, rng = _random_problem(11, (5,), 60, 6, scale=0.5)
    targets, mask = rng.integers(0, 60, size=5), np.array([True, True, False, True, True])
    for name, loss in (("xent_loss", kernels.xent_loss), ("quad_loss", kernels.quad_loss)):
        with pytest.raises(TypeError, match=f"{name} supports reverse-mode differentiation only.*jax.jacrev"):
            jax.jvp(lambda x: loss(x, phi, targets, mask), (h,), (h,))  # noqa: B023
        with pytest.raises(TypeError, match=f"{name} supports reverse-mode"):
            jax.jacfwd(loss)(h, phi, targets, mask)
    with pytest.raises(TypeError, match="log_partition supports reverse-mode differentiation only"):
        jax.jacfwd(lambda x: kernels.log_partition(x, phi))(h)
    forward = jax.jacfwd(lambda x: kernels.masked_mean(kernels.quad_per_position(x, phi, targets), mask))(h)
    np.testing.assert_allclose(forward, _np_loss_and_grads("quad", h, phi, targets, mask)[1], rtol=1e-4, atol=1e-6)


# Public functions of sentcomp.kernels that are not array kernels, or run on numpy arrays too (no jit).
NOT_JITTED = {"check_precision", "vocab_chunk_for", "uses_sigmoid", "fold_moments"}


def test_each_kernel_called_outside_jit_compiles_one_program():
    """Called eagerly, a kernel runs its body as one compiled program (not one per operation, ~10–40 each), and a
    second call with the same shapes compiles nothing. Shapes no other test uses, so nothing is cached yet. The
    kernels that check arguments in Python before their jitted body are called; every other array kernel must
    itself be a jitted function."""
    h, phi, rng = _random_problem(12, (3, 7), 37, 5)
    targets, mask = rng.integers(0, 37, (3, 7)), rng.random((3, 7)) < 0.8
    ids, probs = rng.integers(0, 37, (3, 7, 4)), np.full((3, 7, 4), 0.2, np.float32)
    words = np.array([3, 8, 30])
    calls = {
        "log_partition": lambda: kernels.log_partition(h, phi),
        "expected_values": lambda: kernels.expected_values(h, phi, phi[:, :2]),
        "conditional_mean_features": lambda: kernels.conditional_mean_features(h, phi),
        "word_log_probs": lambda: kernels.word_log_probs(h, phi, words),
        "word_probs": lambda: kernels.word_probs(h, phi, words),
        "masked_mean": lambda: kernels.masked_mean(h[..., 0], mask),
        "xent_per_position": lambda: kernels.xent_per_position(h, phi, targets),
        "quad_per_position": lambda: kernels.quad_per_position(h, phi, targets),
        "xent_loss": lambda: kernels.xent_loss(h, phi, targets, mask),
        "quad_loss": lambda: kernels.quad_loss(h, phi, targets, mask),
        "soft_xent_per_position": lambda: kernels.soft_xent_per_position(h, phi, ids, probs),
        "soft_xent_loss": lambda: kernels.soft_xent_loss(h, phi, ids, probs, mask),
        "soft_quad_loss": lambda: kernels.soft_quad_loss(h, phi, ids, probs, mask),
        "kl_from_features": lambda: kernels.kl_from_features(h, phi, h, phi),
        "top_k_targets": lambda: kernels.top_k_targets(h @ phi.T, 4),
    }
    functions = {name: getattr(kernels, name) for name in kernels.__all__}
    array_kernels = {name for name, f in functions.items() if callable(f) and not isinstance(f, type)} - NOT_JITTED
    assert {name for name in array_kernels - set(calls) if not hasattr(functions[name], "lower")} == set()
    timings.compile_counts()  # starts listening
    for name, call in calls.items():
        compiled = []
        for _ in range(2):
            before = timings.compile_counts().compilations
            jax.block_until_ready(call())
            compiled.append(timings.compile_counts().compilations - before)
        assert compiled == [1, 0], name


def test_log_partition_gradient_is_conditional_mean():
    h, phi, _ = _random_problem(5, (9,), 333, 6)
    want = np.exp(_np_log_softmax(h.astype(np.float64) @ phi.T.astype(np.float64))) @ phi.astype(np.float64)
    grad = jax.grad(lambda x: kernels.log_partition(x, phi, 50).sum())(h)
    np.testing.assert_allclose(grad, want, atol=1e-5)
    np.testing.assert_allclose(kernels.conditional_mean_features(h, phi, 50), want, atol=1e-5)


def test_kernels_vmap_and_jit():
    h, phi, rng = _random_problem(6, (4, 3), 100, 8)
    word_ids = np.array([1, 5, 7])
    want = _np_log_softmax(h.astype(np.float64) @ phi.T.astype(np.float64))[..., word_ids]
    mapped = jax.jit(jax.vmap(lambda x: kernels.word_log_probs(x, phi, jnp.asarray(word_ids), 32)))(h)
    np.testing.assert_allclose(mapped, want, atol=1e-5)


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
