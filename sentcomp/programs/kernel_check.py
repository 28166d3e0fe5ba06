"""Checks the paper's identities with the kernels on a random softmax model (no data, no LM needed).

For random output embeddings Φ and random true next-word distributions p*(.|s):
  * ``Φ p_θ = ∇_θ log Z(θ)`` (conditional-mean features are the gradient of the log-partition function);
  * cross-entropy excess ``ℓ_xent,s(θ) − H(p*(.|s)) = KL(p*(.|s) ‖ p_θ)``;
  * Quad: optimum ``θ* = (ΦΦᵀ)⁻¹ Φ p*`` and excess ``ℓ_quad,s(θ) − ℓ_quad,s(θ*) = ½‖Φᵀ(θ − θ*)‖²``.
Writes ``results.json`` with the largest deviation of each identity (float32 kernels vs float64 numpy).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sentcomp import kernels
from sentcomp.errors import check_sizes
from sentcomp.results import storage


def _expected_per_position(per_position_fn, theta, phi, p_star):
    """``E_{w~p*}[loss(θ, w)]`` for each context, by summing the per-position loss over every word w."""
    words = jnp.arange(phi.shape[0])
    losses = jax.vmap(lambda w: per_position_fn(theta, phi, jnp.full(theta.shape[:-1], w)), out_axes=-1)(words)
    return np.asarray(jnp.sum(losses * p_star, axis=-1), np.float64)


def check_identities(vocab_size: int, dim: int, n_contexts: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(vocab_size, dim)).astype(np.float32) / np.sqrt(dim)
    theta = rng.normal(size=(n_contexts, dim)).astype(np.float32)
    p_star = rng.dirichlet(np.full(vocab_size, 0.5), size=n_contexts)

    grad_log_z = jax.grad(lambda t: kernels.log_partition(t, phi).sum())(theta)
    mean = kernels.conditional_mean_features(theta, phi)

    phi64, theta64 = phi.astype(np.float64), theta.astype(np.float64)
    logits = theta64 @ phi64.T
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    kl = np.sum(p_star * (np.log(p_star) - log_p), axis=-1)
    entropy = -np.sum(p_star * np.log(p_star), axis=-1)
    xent = _expected_per_position(kernels.xent_per_position, theta, phi, p_star)

    theta_star = np.linalg.solve(phi64.T @ phi64, phi64.T @ p_star.T).T
    quad = _expected_per_position(kernels.quad_per_position, theta, phi, p_star)
    quad_star = _expected_per_position(kernels.quad_per_position, theta_star.astype(np.float32), phi, p_star)
    quad_excess = 0.5 * np.sum(((theta64 - theta_star) @ phi64.T) ** 2, axis=-1)

    return {
        "conditional_mean_vs_grad_log_z": float(np.abs(np.asarray(mean) - np.asarray(grad_log_z)).max()),
        "conditional_mean_vs_float64": float(np.abs(np.asarray(mean) - np.exp(log_p) @ phi64).max()),
        "xent_excess_vs_kl": float(np.abs((xent - entropy) - kl).max()),
        "quad_excess_vs_half_sq_norm": float(np.abs((quad - quad_star) - quad_excess).max()),
    }


def check_config(config) -> None:
    """The sizes must be ≥ 1 (checked by the launcher before it claims the workdir)."""
    check_sizes(config, "vocab_size", "dim", "n_contexts")


def run(config, workdir: Path) -> dict[str, float]:
    deviations = check_identities(config.vocab_size, config.dim, config.n_contexts, config.seed)
    storage.write_json(Path(workdir) / "results.json", deviations)
    print(f"{'identity':<34} largest deviation")
    for name, value in deviations.items():
        print(f"{name:<34} {value:.2e}")
    return deviations
