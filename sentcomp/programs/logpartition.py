"""The quadratic log-partition assumption and the affine map Φp_f ≈ A f + b, measured on any LM sentcomp loads.

On real contexts s (Rotten Tomatoes review snippets + the sentiment prompt) take θ = f(s), the true
``log Z(θ)`` and the conditional mean ``Φp_f(s)`` (streamed kernels, via :func:`sentcomp.features.extract_features`),
split the contexts in halves (seeded), fit on one and report held-out R² on the other for:

- ``quadratic``: ``log Z ≈ ½θᵀAθ + bᵀθ + c`` with A free. When d(d+1)/2 exceeds ``max_quadratic_terms`` the
  quadratic part lives in the top-k principal directions of the training θ (``A = PᵀA_kP``, k =
  ``quadratic_rank``); b is always full (``sentcomp.kernels.fit_log_partition``).
- ``linear``: ``log Z ≈ bᵀθ + c`` (A = 0), the baseline that says how much the quadratic part adds.
- ``fixed_a_cov``: A fixed to ``Cov(φ_w)`` (the Gaussian-embedding motivation), b and c fitted.
- ``gaussian``: nothing fitted: ``log V + μᵀθ + ½θᵀΣθ`` with μ, Σ the mean and covariance of the φ_w.
- ``affine``: ``Φp_f(s) ≈ A f(s) + b`` (R² pooled over the d outputs).

Writes ``results.json``, ``results.md`` and ``log_partition_fit.png`` (fitted vs true log Z on held-out
contexts, one panel per variant, with y = x). Features are cached under ``workdir/features`` (resumable).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sentcomp import kernels, models
from sentcomp.errors import SentcompError, check_sizes
from sentcomp.features import extract_features
from sentcomp.results import layout, storage
from sentcomp.results.tables import markdown_table


def load_texts(num_texts: int, seed: int) -> list[str]:
    """``num_texts`` Rotten Tomatoes snippets (both labels, seeded choice; all of them if ``num_texts`` ≤ 0)."""
    from sentcomp.data.rotten_tomatoes import read_snippets

    texts = read_snippets().texts
    if 0 < num_texts < len(texts):
        order = np.random.default_rng(seed).permutation(len(texts))[:num_texts]
        texts = [texts[i] for i in sorted(order)]
    return texts


def principal_directions(theta: np.ndarray, rank: int) -> np.ndarray:
    """The top-``rank`` principal directions of the rows of ``theta`` (orthonormal rows), ``[rank, d]``."""
    centred = theta - theta.mean(axis=0)
    return np.linalg.svd(centred, full_matrices=False)[2][:rank]


def fit_all(theta, log_z, phi_p_f, phi, train, test, *, ridge: float, max_quadratic_terms: int,
            quadratic_rank: int) -> tuple[dict, dict]:
    """Fits every variant on ``train`` rows; returns ``{variant: metrics}`` and held-out predictions."""
    theta32 = jnp.asarray(theta, jnp.float32)
    log_z32 = jnp.asarray(log_z, jnp.float32)
    dim = theta.shape[1]
    basis = None
    if dim * (dim + 1) // 2 > max_quadratic_terms:
        basis = jnp.asarray(principal_directions(theta[train], min(quadratic_rank, dim)), jnp.float32)
    linear_b, linear_c = kernels.partition.least_squares(theta32[train], log_z32[train], ridge)
    zero = jnp.zeros((dim, dim), jnp.float32)
    fits = {
        "quadratic": kernels.fit_log_partition(theta32[train], log_z32[train], ridge, basis),
        "linear": kernels.QuadraticFit(zero, linear_b, linear_c),
        "fixed_a_cov": kernels.fit_log_partition_fixed_a(
            theta32[train], log_z32[train], kernels.embedding_covariance(phi), ridge
        ),
        "gaussian": kernels.gaussian_log_partition(phi),
    }
    metrics, predictions = {}, {}
    for name, fit in fits.items():
        predictions[name] = np.asarray(fit(theta32[test]), np.float64)
        metrics[name] = {
            "train_r2": float(kernels.r_squared(log_z32[train], fit(theta32[train]))),
            "test_r2": float(kernels.r_squared(log_z32[test], predictions[name])),
            "test_rmse": float(np.sqrt(np.mean((predictions[name] - log_z[test]) ** 2))),
        }
    metrics["quadratic"]["quadratic_rank"] = int(dim if basis is None else basis.shape[0])
    phi_p_f32 = jnp.asarray(phi_p_f, jnp.float32)
    affine = kernels.fit_affine(theta32[train], phi_p_f32[train], ridge)
    metrics["affine"] = {
        "train_r2": float(kernels.r_squared(phi_p_f32[train], affine(theta32[train]))),
        "test_r2": float(kernels.r_squared(phi_p_f32[test], affine(theta32[test]))),
    }
    return metrics, predictions


def plot_fits(log_z_test: np.ndarray, predictions: dict, metrics: dict, title: str, path: Path) -> None:
    """Fitted vs true log Z scatter per variant, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(predictions), figsize=(4 * len(predictions), 4), squeeze=False)
    low = min(log_z_test.min(), *(p.min() for p in predictions.values()))
    high = max(log_z_test.max(), *(p.max() for p in predictions.values()))
    for axis, (name, predicted) in zip(axes[0], predictions.items()):
        axis.scatter(log_z_test, predicted, s=4, alpha=0.5)
        axis.plot([low, high], [low, high], "k--", lw=1)
        axis.set_title(f"{name}: held-out R² = {metrics[name]['test_r2']:.3f}")
        axis.set_xlabel("true log Z(f(s))")
        axis.set_ylabel("fitted")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_markdown(results: dict) -> str:
    lines = [
        f"# Log-partition fits: {results['model']} ({results['model_name']})",
        "",
        f"{results['num_contexts']} contexts (Rotten Tomatoes snippets, prompt {results['prompt']!r}), "
        f"d = {results['dim']}, V = {results['vocab_size']}; fitted on {results['num_train']}, R² on the other "
        f"{results['num_test']}.",
        "",
    ]
    if results["num_train"] <= results["dim"] + 1:
        lines += [
            f"**Note:** {results['num_train']} fitting contexts ≤ d + 1 = {results['dim'] + 1}: every fit with b free "
            "can interpolate them (train R² ≈ 1 says nothing); read the held-out R², and use more contexts "
            "(`num_texts`) for conclusions.",
            "",
        ]
    lines += [markdown_table(["fit", "train R²", "held-out R²"],
                             ([name, f"{entry['train_r2']:.4f}", f"{entry['test_r2']:.4f}"]
                              for name, entry in results["fits"].items())),
              "", f"log Z over these contexts: mean {results['log_z_mean']:.4g}, std {results['log_z_std']:.3g}.",
              "", "![fitted vs true](log_partition_fit.png)", ""]
    return "\n".join(lines)


def check_config(config) -> None:
    """Checked by the launcher before it claims the workdir: sizes, the train fraction, the model found offline."""
    check_sizes(config, "max_length", "batch_size", "quadratic_rank")
    if not 0.0 < config.train_fraction < 1.0:
        raise SentcompError(f"train_fraction must be in (0, 1), got {config.train_fraction}.")
    models.hf.check_source(config.model, known=(models.RANDOM_GPT2, *models.ALIASES))


def run(config, workdir) -> dict:
    check_config(config)
    workdir = Path(workdir)
    lm = models.from_config(config)
    texts = load_texts(config.num_texts, config.seed)
    extracted = extract_features(
        lm, texts, kinds=("f", "phi_p_f", "log_z"), prompt=config.prompt, max_length=config.max_length,
        batch_size=config.batch_size, cache_dir=workdir / "features",
    )
    theta = np.asarray(extracted["f"], np.float64)
    log_z = np.asarray(extracted["log_z"], np.float64)
    phi = jnp.asarray(lm.phi, jnp.float32)
    order = np.random.default_rng(config.seed).permutation(len(texts))
    cut = int(round(config.train_fraction * len(texts)))
    train, test = np.sort(order[:cut]), np.sort(order[cut:])
    metrics, predictions = fit_all(
        theta, log_z, extracted["phi_p_f"], phi, train, test, ridge=config.ridge,
        max_quadratic_terms=config.max_quadratic_terms, quadratic_rank=config.quadratic_rank,
    )
    results = {
        "model": config.model,
        "model_name": lm.name,
        "prompt": config.prompt,
        "num_contexts": len(texts),
        "num_train": len(train),
        "num_test": len(test),
        "dim": int(theta.shape[1]),
        "vocab_size": int(phi.shape[0]),
        "log_z_mean": float(log_z.mean()),
        "log_z_std": float(log_z.std()),
        "fits": metrics,
    }
    storage.write_json(workdir / layout.RESULTS_FILE, results)
    storage.write_text(workdir / layout.RESULTS_MARKDOWN, results_markdown(results))
    plot_fits(log_z[test], predictions, metrics, f"log Z(f(s)) fits, {config.model}", workdir / "log_partition_fit.png")
    print(results_markdown(results))
    return {f"{name}_test_r2": entry["test_r2"] for name, entry in metrics.items()}
