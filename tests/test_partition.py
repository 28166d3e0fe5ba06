"""Log-partition and affine fits: recover known quadratics/affine maps; agree with float64 numpy least squares."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import kernels


def _random_symmetric(rng, d):
    m = rng.normal(size=(d, d))
    return (m + m.T) / 2


@pytest.mark.slow
def test_quadratic_fit_recovers_a_known_quadratic_exactly():
    rng = np.random.default_rng(0)
    d, n = 6, 200
    a, b, c = _random_symmetric(rng, d), rng.normal(size=d), 1.7
    theta = rng.normal(size=(n, d)) * 3.0 + 5.0  # off-centre, large-ish values: exercises the standardisation
    log_z = 0.5 * np.einsum("ni,ij,nj->n", theta, a, theta) + theta @ b + c
    fit = kernels.fit_log_partition(jnp.asarray(theta, jnp.float32), jnp.asarray(log_z, jnp.float32))
    np.testing.assert_allclose(fit.a, a, atol=2e-3)
    np.testing.assert_allclose(fit.b, b, atol=2e-2)
    np.testing.assert_allclose(fit.c, c, atol=5e-2)
    assert float(kernels.r_squared(log_z, fit(theta.astype(np.float32)))) > 1 - 1e-6


@pytest.mark.slow
def test_quadratic_fit_in_a_subspace_recovers_a_low_rank_quadratic():
    rng = np.random.default_rng(1)
    d, k, n = 10, 3, 300
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0].T  # [k, d] orthonormal rows
    a_k, b = _random_symmetric(rng, k), rng.normal(size=d)
    theta = rng.normal(size=(n, d))
    log_z = 0.5 * np.einsum("ni,ij,nj->n", theta @ basis.T, a_k, theta @ basis.T) + theta @ b - 0.3
    fit = kernels.fit_log_partition(jnp.asarray(theta, jnp.float32), jnp.asarray(log_z, jnp.float32),
                                    basis=jnp.asarray(basis, jnp.float32))
    np.testing.assert_allclose(fit.a, basis.T @ a_k @ basis, atol=1e-4)
    np.testing.assert_allclose(fit.b, b, atol=1e-4)


def test_ridge_fit_matches_float64_normal_equations():
    rng = np.random.default_rng(2)
    n, d, ridge = 80, 5, 3.0
    x, y = rng.normal(size=(n, d)) * rng.uniform(0.5, 4, size=d), rng.normal(size=n)
    weights, intercept = kernels.partition.least_squares(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                                         ridge)
    scale = x.std(0)
    z, yc = (x - x.mean(0)) / scale, y - y.mean()
    expected_std = np.linalg.solve(z.T @ z + ridge * np.eye(d), z.T @ yc)
    np.testing.assert_allclose(weights, expected_std / scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(intercept, y.mean() - x.mean(0) @ (expected_std / scale), atol=1e-5)


def test_fixed_a_and_gaussian_variants():
    rng = np.random.default_rng(3)
    vocab, d = 4000, 4
    phi = rng.normal(size=(vocab, d)) * 0.3 + 0.1
    cov = np.cov(phi.T, bias=True)
    np.testing.assert_allclose(kernels.embedding_covariance(jnp.asarray(phi, jnp.float32)), cov, atol=1e-5)
    theta = rng.normal(size=(100, d))
    log_z = np.log(np.exp(theta @ phi.T).sum(-1))
    # With Gaussian embeddings and small θ the zero-parameter prediction is already close.
    gaussian = kernels.gaussian_log_partition(jnp.asarray(phi, jnp.float32))
    assert float(kernels.r_squared(log_z, gaussian(theta.astype(np.float32)))) > 0.99
    # Fixing A to a known quadratic part: b and c are recovered exactly.
    b, c = rng.normal(size=d), 0.4
    target = 0.5 * np.einsum("ni,ij,nj->n", theta, cov, theta) + theta @ b + c
    fit = kernels.fit_log_partition_fixed_a(jnp.asarray(theta, jnp.float32), jnp.asarray(target, jnp.float32),
                                            jnp.asarray(cov, jnp.float32))
    np.testing.assert_allclose(fit.b, b, atol=1e-4)
    np.testing.assert_allclose(fit.c, c, atol=1e-4)


def test_affine_fit_recovers_a_known_affine_map_and_r_squared_is_the_usual_one():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    x = rng.normal(size=(50, 5)) * 10
    fit = kernels.fit_affine(jnp.asarray(x, jnp.float32), jnp.asarray(x @ a.T + b, jnp.float32))
    np.testing.assert_allclose(fit.a, a, atol=1e-4)
    np.testing.assert_allclose(fit.b, b, atol=1e-3)
    y, y_hat = rng.normal(size=(40, 2)), rng.normal(size=(40, 2))
    expected = 1 - ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    np.testing.assert_allclose(kernels.r_squared(jnp.asarray(y), jnp.asarray(y_hat)), expected, rtol=1e-5)


def test_logpartition_smoke_config_runs(smoke_workdir):
    """The program end to end on a tiny random GPT-2 (random N(0, σ²) embeddings: the Gaussian motivation holds)."""
    workdir = smoke_workdir("logpartition")
    results = json.loads((workdir / "results.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    assert results["num_train"] + results["num_test"] == config["num_texts"] and results["dim"] == 8
    assert set(results["fits"]) == {"quadratic", "linear", "fixed_a_cov", "gaussian", "affine"}
    fits = results["fits"]
    assert results["log_z_std"] > 0  # small logits (θᵀφ ~ 0.3): log Z is close to its 2nd-order expansion, so
    assert fits["gaussian"]["test_r2"] > 0.9 and fits["affine"]["test_r2"] > 0.99  # ... these hold, and
    assert fits["quadratic"]["test_r2"] > max(0.99, fits["linear"]["test_r2"])  # the quadratic term matters
    assert (workdir / "log_partition_fit.png").stat().st_size > 10_000
    assert "held-out R²" in (workdir / "results.md").read_text()
