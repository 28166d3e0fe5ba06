"""Checks that sentcomp computes correctly (and how fast) on the machine it runs on: a pass/fail table.

Run it first on a new TPU slice, GPU host or CPU box (tpu_configs/README.md). Every comparison is against an
independent reference: float64 numpy, scikit-learn, or the same computation done another way. The groups
(``config.checks``), with the error each row reports (``rel`` = max |Δ| / max |reference|):

* ``kernels`` at their pinned precision (HIGHEST, docs/precision.md) against float64 numpy, on a random softmax
  model (h ``[n, d]``, Φ ``[V, d]``): the streamed ``log Z``, the conditional-mean features ``Φp_f``, the Quad
  loss per position through its Gram trick ``½hᵀ(ΦᵀΦ)h − hᵀφ_w`` (numpy forms ``½‖Φᵀh‖²`` directly) and the
  ridge probe solver (``ridge_moments`` + ``ridge_grid``) against numpy's normal-equation solve. On TPU/GPU a
  product left at the default precision is off by ~1e-3 relative, far above these tolerances.
* ``identities``: the paper's softmax/Quad identities with the kernels on a random softmax model (Φ ``[V, d]``,
  contexts θ, true next-word distributions p*(·|s) drawn from a Dirichlet), each the largest deviation (max |Δ|)
  of float32 kernels from float64 numpy: ``Φ p_θ = ∇_θ log Z(θ)`` (conditional-mean features are the gradient of
  the log-partition function) and ``Φ p_θ`` itself; the cross-entropy excess ``ℓ_xent,s(θ) − H(p*(·|s)) =
  KL(p*(·|s) ‖ p_θ)``; Quad's optimum ``θ* = (ΦᵀΦ)⁻¹Φᵀp*`` and excess ``ℓ_quad,s(θ) − ℓ_quad,s(θ*) =
  ½‖Φ(θ − θ*)‖²``. (Formerly the ``kernel_check`` program.)
* ``forward``: the features f(s) of a random GPT-2 (GPT-2 small's shape by default) with its parameters cast to
  ``compute_dtype``, at the backend's default matmul precision, against the float32 forward pass at HIGHEST
  precision; the error is the largest relative L2 error of one position's f(s). The tolerance is per dtype:
  bfloat16's rounding, and for float32 what TPUs (bf16 passes) and GPUs (TF32) do to default-precision products.
* ``probe``: :func:`sentcomp.probe.evaluate` (``protocol="paper"``, ``grid=[1]``: its refit on all of train is
  multinomial logistic regression at C = 1) against scikit-learn's ``LogisticRegression(C=1)`` on the same
  seeded Gaussian features: test accuracy (difference, in test examples) and the coefficients (``rel``).
* ``pretraining``: ``num_steps`` steps of :mod:`sentcomp.training` (``make_optimizer``, ``make_train_step``, the
  data plan) on a small GPT-2 and random tokens, with an Orbax checkpoint saved at ``checkpoint_step`` and
  restored by ``checkpoints.resume``: the restored parameters against the saved ones, and the parameters after
  continuing from the restore against an uninterrupted run (max |Δ|).
* ``features``: :func:`sentcomp.features.extract_features` (f, Φp_f, log Z of seeded texts under the small
  GPT-2) on one device per process against all devices (``rel``).
* ``throughput``: tokens/s and model FLOPs utilisation (:mod:`sentcomp.training.throughput`) of the GPT-2 forward pass
  (f(s), no output projection) and of a train step (the pretraining rows' loss and optimiser), in
  ``compute_dtype``, data-parallel over every device: informational rows that pass when they ran and are finite.
* ``multihost``: the kernels on a globally sharded batch give the numbers one process gives (formerly the
  ``multihost_check`` program). Every process builds the same seeded Φ (replicated) and generates only its own
  rows of a seeded batch of contexts (:func:`sentcomp.parallel.host_row_indices`; row ``i`` depends on
  ``(seed, i)`` alone, so any process layout sees the same global batch); one jitted step over the global mesh
  computes ``ℓ_xent = E_{(s,w)}[log Z(f(s)) − f(s)ᵀφ_w]`` over masked positions, its gradients with respect to
  ``h`` (sharded) and Φ (a cross-host all-reduce), and ``Φ p_f(s)`` at each context's last position; the real
  feature pipeline (:func:`sentcomp.features.extract_features`) runs a seeded tiny random GPT-2 over seeded
  texts. The arrays go to ``multihost_arrays.npz`` and through an Orbax checkpoint all processes write together
  (``multihost_checkpoint/``; a re-run restores it instead of writing it, so a run on another process layout
  compares with it): the restored arrays against the computed ones (max |Δ|). A row also checks that
  :func:`sentcomp.parallel.main_decides` hands every process process 0's value. The loss and norms are
  informational rows; tests/test_multihost.py runs the group as 2 processes × 4 CPU devices and compares
  with 1 process × 8 devices.

Multi-host: every process runs the same program (``--distributed``) on the same seeded inputs; batches are split
over the global mesh (:mod:`sentcomp.parallel`), the checkpoint is written by all processes together into the
workdir (a shared filesystem), and process 0 writes ``results.md`` / ``results.json``. Every process prints the
table. The pretraining check's checkpoint directory (``pretraining_check/``) is emptied at the start of each run;
the multihost group's (``multihost_checkpoint/``) is kept, to be restored by the next run.

If any row fails, :func:`run` raises :class:`SentcompError` naming the failed checks, after writing the table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sentcomp import features, kernels, parallel, probe
from sentcomp.errors import SentcompError, check_sizes
from sentcomp.models import gpt2, tokenizers
from sentcomp.models.base import COMPUTE_DTYPES, LanguageModel, cast_floats
from sentcomp.results import layout, storage
from sentcomp.results.tables import markdown_table
from sentcomp.training import checkpoints, steps, throughput

CHECKS = ("kernels", "identities", "forward", "probe", "pretraining", "features", "multihost", "throughput")
SCRATCH = "pretraining_check"
MULTIHOST_ARRAYS = "multihost_arrays.npz"
MULTIHOST_CHECKPOINT = "multihost_checkpoint"


@dataclasses.dataclass(frozen=True)
class Check:
    """One row: ``value`` (an error, or a measurement when ``tolerance`` is None) and whether it passed."""

    name: str
    compared: str
    value: float
    tolerance: float | None = None  # None: informational, passes when the value is finite

    @property
    def passed(self) -> bool:
        return math.isfinite(self.value) and (self.tolerance is None or self.value <= self.tolerance)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


def relative_error(value, reference) -> float:
    """``max |value − reference| / max |reference|``, in float64."""
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(value - reference).max() / max(np.abs(reference).max(), np.finfo(np.float64).tiny))


def max_abs_difference(tree, reference) -> float:
    """The largest ``|a − b|`` over every pair of leaves of two pytrees of the same structure."""
    return max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True))


def device_info() -> dict[str, Any]:
    device = jax.local_devices()[0]
    return {"backend": jax.default_backend(), "device_kind": str(device.device_kind),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count(), "jax_version": jax.__version__}


# ------------------------------------------------------------------------------------------------- kernels


def softmax_model(cfg, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Contexts ``h [n, d]`` (logits of std ≈ ``logit_scale``) and output embeddings ``Φ [V, d]``, float32."""
    rng = np.random.default_rng(seed)
    h = (cfg.logit_scale * rng.normal(size=(cfg.n_contexts, cfg.dim))).astype(np.float32)
    phi = (rng.normal(size=(cfg.vocab_size, cfg.dim)) / np.sqrt(cfg.dim)).astype(np.float32)
    return h, phi


def softmax_reference(h: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log Z(h) = log Σ_w exp(hᵀφ_w)`` and ``Φp_f = Σ_w p_f(w) φ_w``, ``p_f(w) = exp(hᵀφ_w) / Z``, in float64."""
    logits = h.astype(np.float64) @ phi.astype(np.float64).T
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z, np.exp(logits - log_z[:, None]) @ phi.astype(np.float64)


def quad_reference(h: np.ndarray, phi: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``½‖Φᵀh‖² − hᵀφ_w`` at each position in float64, forming the V-wide ``Φᵀh`` (no Gram matrix)."""
    h64, phi64 = h.astype(np.float64), phi.astype(np.float64)
    return 0.5 * np.sum((h64 @ phi64.T) ** 2, axis=1) - np.sum(h64 * phi64[targets], axis=1)


def ridge_reference(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's ``Ridge`` (unpenalised intercept) in float64: ``W = (XcᵀXc + αI)⁻¹XcᵀYc``, ``b = ȳ − x̄ᵀW``."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    xc, yc = x64 - x64.mean(axis=0), y64 - y64.mean(axis=0)
    coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return coef, y64.mean(axis=0) - x64.mean(axis=0) @ coef


def kernel_checks(cfg, tolerance, seed: int) -> list[Check]:
    """The kernels at their default (pinned) precision against float64 numpy."""
    h, phi = softmax_model(cfg, seed)
    log_z, phi_p_f = softmax_reference(h, phi)
    rng = np.random.default_rng(seed + 1)
    targets = rng.integers(cfg.vocab_size, size=cfg.n_contexts)
    quad = kernels.quad_per_position(h, phi, targets)
    x = rng.normal(size=(cfg.ridge_rows, cfg.ridge_dim)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(3, size=cfg.ridge_rows)]
    fits = kernels.ridge_grid(kernels.ridge_moments(x, y, np.ones((1, cfg.ridge_rows), np.float32)),
                              np.array([cfg.ridge_alpha], np.float32))
    coef, intercept = ridge_reference(x, y, cfg.ridge_alpha)
    size = f"V={cfg.vocab_size}, d={cfg.dim}, n={cfg.n_contexts}"
    return [
        Check("kernel log Z", f"log_partition vs float64 ({size}), rel", relative_error(
            kernels.log_partition(h, phi), log_z), tolerance.log_z),
        Check("kernel Φp_f", f"conditional_mean_features vs float64 ({size}), rel", relative_error(
            kernels.conditional_mean_features(h, phi), phi_p_f), tolerance.phi_p_f),
        Check("kernel Quad (Gram)", f"quad_per_position vs float64 ½‖Φᵀh‖² − hᵀφ_w ({size}), rel",
              relative_error(quad, quad_reference(h, phi, targets)), tolerance.quad),
        Check("kernel ridge", f"ridge_grid coef, intercept vs float64 solve (n={cfg.ridge_rows}, d={cfg.ridge_dim}), "
              "rel", max(relative_error(fits.coef[0, 0], coef), relative_error(fits.intercept[0, 0], intercept)),
              tolerance.ridge),
    ]


# ---------------------------------------------------------------------------------------------- identities


def expected_per_position(per_position_fn, theta, phi, p_star) -> np.ndarray:
    """``E_{w~p*}[loss(θ, w)]`` for each context, by summing the per-position loss over every word w."""
    words = jnp.arange(phi.shape[0])
    losses = jax.vmap(lambda w: per_position_fn(theta, phi, jnp.full(theta.shape[:-1], w)), out_axes=-1)(words)
    return np.asarray(jnp.sum(losses * p_star, axis=-1), np.float64)


def identity_deviations(vocab_size: int, dim: int, n_contexts: int, seed: int) -> dict[str, float]:
    """The largest deviation (max |Δ|) of each identity of the module docstring's ``identities`` group."""
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
    xent = expected_per_position(kernels.xent_per_position, theta, phi, p_star)

    theta_star = np.linalg.solve(phi64.T @ phi64, phi64.T @ p_star.T).T
    quad = expected_per_position(kernels.quad_per_position, theta, phi, p_star)
    quad_star = expected_per_position(kernels.quad_per_position, theta_star.astype(np.float32), phi, p_star)
    quad_excess = 0.5 * np.sum(((theta64 - theta_star) @ phi64.T) ** 2, axis=-1)

    return {
        "conditional_mean_vs_grad_log_z": float(np.abs(np.asarray(mean) - np.asarray(grad_log_z)).max()),
        "conditional_mean_vs_float64": float(np.abs(np.asarray(mean) - np.exp(log_p) @ phi64).max()),
        "xent_excess_vs_kl": float(np.abs((xent - entropy) - kl).max()),
        "quad_excess_vs_half_sq_norm": float(np.abs((quad - quad_star) - quad_excess).max()),
    }


IDENTITY_ROWS = {  # deviation key -> (row name, what was compared)
    "conditional_mean_vs_grad_log_z": ("identity Φp = ∇log Z",
                                       "conditional_mean_features vs jax.grad of log_partition"),
    "conditional_mean_vs_float64": ("identity Φp float64", "conditional_mean_features vs float64 numpy"),
    "xent_excess_vs_kl": ("identity xent excess = KL", "E_p*[xent_per_position] − H(p*) vs float64 KL(p* ‖ p_θ)"),
    "quad_excess_vs_half_sq_norm": ("identity Quad excess", "E_p*[quad_per_position] at θ − at θ* vs float64 "
                                    "½‖Φ(θ − θ*)‖²"),
}


def identity_checks(cfg, tolerance, seed: int) -> list[Check]:
    """The paper's identities on a random softmax model, one row each (max |Δ|)."""
    deviations = identity_deviations(cfg.vocab_size, cfg.dim, cfg.n_contexts, seed)
    size = f"V={cfg.vocab_size}, d={cfg.dim}, n={cfg.n_contexts}"
    return [Check(name, f"{compared} ({size}), max |Δ|", deviations[key], tolerance.identities[key])
            for key, (name, compared) in IDENTITY_ROWS.items()]


# ------------------------------------------------------------------------------------------------- models


def random_gpt2(shape, seed: int) -> LanguageModel:
    """A randomly initialised GPT-2 of ``shape`` (n_layer, n_embd, n_head, vocab_size ≥ 257, n_positions), with
    the byte-level tokenizer (no asset needed)."""
    config = gpt2.gpt2_config(**shape)
    return gpt2.init(config, seed, tokenizer=tokenizers.byte_tokenizer(),
                     name=f"gpt2-random(L={config.n_layer},d={config.n_embd})")


def random_tokens(shape: tuple[int, ...], vocab_size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(vocab_size, size=shape).astype(np.int32)


def forward_check(lm: LanguageModel, cfg, compute_dtype: str, tolerance, seed: int) -> Check:
    """f(s) with parameters in ``compute_dtype`` at the default matmul precision vs float32 at HIGHEST."""
    tokens = random_tokens((cfg.batch_size, cfg.seq_len), lm.config.vocab_size, seed)
    mask = np.ones_like(tokens)
    forward = jax.jit(lm.hidden_fn)
    with jax.default_matmul_precision("highest"):
        reference = np.asarray(forward(lm.params, tokens, mask), np.float64)
    hidden = np.asarray(forward(cast_floats(lm.params, COMPUTE_DTYPES[compute_dtype]), tokens, mask), np.float64)
    errors = np.linalg.norm(hidden - reference, axis=-1) / np.linalg.norm(reference, axis=-1)
    c = lm.config
    return Check(f"forward {compute_dtype}", f"GPT-2 f(s) (L={c.n_layer}, d={c.n_embd}, {cfg.batch_size}×"
                 f"{cfg.seq_len} tokens) vs float32 at HIGHEST, max rel L2 per position",
                 float(errors.max()), tolerance.forward[compute_dtype])


# --------------------------------------------------------------------------------------------------- probe


def gaussian_classes(means: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of unit-variance Gaussian classes around ``means [classes, d]``, and their labels."""
    labels = rng.integers(len(means), size=n)
    return (means[labels] + rng.normal(size=(n, means.shape[1]))).astype(np.float32), labels


def probe_checks(cfg, tolerance, seed: int) -> list[Check]:
    """sentcomp's logistic probe (C = 1) vs scikit-learn's on the same features."""
    from sklearn.linear_model import LogisticRegression  # here: ~2 s to import, and only this group needs it
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(cfg.num_classes, cfg.dim)) * 2.0 / np.sqrt(cfg.dim)  # overlapping classes
    x_train, y_train = gaussian_classes(means, cfg.num_train, rng)
    x_test, y_test = gaussian_classes(means, cfg.num_test, rng)
    # the paper's protocol with a one-point grid: its final probe is L2 logistic regression at C = 1 on all of train
    ours = probe.evaluate(x_train, y_train, x_test, y_test, protocol="paper", grid=[1.0], tol=1e-6)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x_train.astype(np.float64), y_train)
    accuracy = reference.score(x_test.astype(np.float64), y_test)
    size = f"{cfg.num_classes} classes, d={cfg.dim}, {cfg.num_train} train / {cfg.num_test} test"
    return [
        Check("probe accuracy", f"probe.evaluate(paper, C=1) vs sklearn LogisticRegression(C=1) test accuracy "
              f"{ours.test_accuracy:.3f} vs {accuracy:.3f} ({size}), |Δ| in test examples",
              float(round(abs(ours.test_accuracy - accuracy) * cfg.num_test)), tolerance.probe_accuracy),
        Check("probe coefficients", "the same fits' coefficients and intercepts, rel",
              max(relative_error(ours.coef, reference.coef_.T), relative_error(ours.intercept,
                                                                                 reference.intercept_)),
              tolerance.probe_coef),
    ]


# --------------------------------------------------------------------------------------------- pretraining


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The optimiser and jitted train step of a model (:func:`sentcomp.training.steps.make_train_step`)."""

    optimizer: Any
    step: Any

    @classmethod
    def build(cls, lm: LanguageModel, config, mesh) -> Trainer:
        """``config.pretraining.loss``, ``config.optimizer`` over ``config.pretraining.num_steps``, in
        ``config.compute_dtype``, data-parallel over ``mesh``."""
        optimizer = steps.make_optimizer(config.optimizer, config.pretraining.num_steps, lm.params)
        return cls(optimizer, steps.make_train_step(config.pretraining.loss, lm.hidden_fn, lm.phi_fn, optimizer,
                                                       COMPUTE_DTYPES[config.compute_dtype], mesh))


def train(step_fn, state, plan: steps.DataPlan, mesh, start: int, stop: int):
    """``state`` after the steps ``start .. stop − 1`` of ``plan``."""
    for step in range(start, stop):
        state, _ = step_fn(state, parallel.global_batch(plan.local_tokens(step), mesh))
    return state


def pretraining_checks(lm: LanguageModel, trainer: Trainer, config, mesh, directory: Path) -> list[Check]:
    """Save at ``checkpoint_step``, restore with ``checkpoints.resume``, continue: equal to saved and to
    uninterrupted."""
    cfg, tolerance = config.pretraining, config.tolerance
    if parallel.is_main_process() and directory.exists():
        shutil.rmtree(directory)
    parallel.sync("sentcomp_device_check_scratch")
    blocks = random_tokens((4 * cfg.batch_size, cfg.seq_len + 1), lm.config.vocab_size, config.seed)
    plan = steps.DataPlan(blocks, cfg.batch_size, 1, config.seed, parallel.host_row_indices(cfg.batch_size, mesh))
    host_params = jax.device_get(lm.params)  # the train step donates its state: start each run from a copy

    def fresh():
        return steps.initial_state(host_params, trainer.optimizer, mesh)

    uninterrupted = parallel.fetch(train(trainer.step, fresh(), plan, mesh, 0, cfg.num_steps)["params"])
    manager, state, _ = checkpoints.resume(directory, fresh(), every=1, keep=1)
    state = train(trainer.step, state, plan, mesh, 0, cfg.checkpoint_step)
    saved = parallel.fetch(state["params"])
    checkpoints.save_checkpoint(manager, state, {"step": cfg.checkpoint_step})
    manager.wait_until_finished()
    manager.close()
    manager, restored, meta = checkpoints.resume(directory, fresh(), every=1, keep=1)
    manager.close()
    if meta is None or meta["step"] != cfg.checkpoint_step:
        raise SentcompError(f"The device check's checkpoint in {directory} was not found after saving it: "
                            f"restore returned {meta}.")
    restored_params = parallel.fetch(restored["params"])
    resumed = parallel.fetch(train(trainer.step, restored, plan, mesh, cfg.checkpoint_step, cfg.num_steps)["params"])
    what = f"{cfg.loss}, {config.compute_dtype}, {cfg.batch_size}×{cfg.seq_len} tokens"
    return [
        Check("checkpoint restore", f"Orbax-restored params vs saved at step {cfg.checkpoint_step} ({what}), max |Δ|",
              max_abs_difference(restored_params, saved), tolerance.restored),
        Check("resume", f"params after {cfg.num_steps} steps resumed at {cfg.checkpoint_step} vs uninterrupted, "
              "max |Δ|", max_abs_difference(resumed, uninterrupted), tolerance.resumed),
    ]


# ------------------------------------------------------------------------------------------------ features


def seeded_texts(n: int, seed: int, max_words: int = 30) -> list[str]:
    """``n`` texts of 2 to ``max_words`` random lowercase words (of 1–7 letters)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return [" ".join("".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(rng.integers(2, max_words)))
            for _ in range(n)]


def one_device_per_process() -> list:
    """The first device of each process: one device in a single-process run. (With several processes the mesh
    must span them all: ``parallel.fetch`` gathers every process's outputs, so a mesh of one local device on
    each process would return the batch once per process.)"""
    return [next(d for d in jax.devices() if d.process_index == p) for p in range(jax.process_count())]


def features_check(lm: LanguageModel, cfg, tolerance, seed: int) -> Check:
    """f, Φp_f and log Z of seeded texts on one device per process vs every device."""
    texts, kinds = seeded_texts(cfg.n_texts, seed), ("f", "phi_p_f", "log_z")
    few = parallel.data_mesh(one_device_per_process())

    def extract(mesh):
        return features.extract_features(lm, texts, kinds, batch_size=cfg.batch_size, mesh=mesh, progress=False)

    reference, full = extract(few), extract(parallel.data_mesh())
    return Check("features 1 device per host vs all", f"extract_features f, Φp_f, log Z ({cfg.n_texts} texts) on "
                 f"{few.size} vs {jax.device_count()} devices, rel",
                 max(relative_error(full[kind], reference[kind]) for kind in kinds), tolerance.features)


# ----------------------------------------------------------------------------------------------- multihost


def multihost_rows(rows: np.ndarray, cfg, seed: int) -> dict[str, np.ndarray]:
    """Rows ``rows`` of the global batch: features ``h [n, T, d]``, next-word ``targets [n, T]``, ``mask [n, T]``
    (right padding). Row ``i`` is drawn from ``default_rng((seed, i))``, so a process generates only its rows."""
    h, targets, mask = [], [], []
    for row in rows:
        rng = np.random.default_rng((seed, int(row)))
        h.append(rng.normal(size=(cfg.positions, cfg.dim)).astype(np.float32))
        targets.append(rng.integers(cfg.vocab_size, size=cfg.positions).astype(np.int32))
        mask.append(np.arange(cfg.positions) < rng.integers(1, cfg.positions + 1))
    return {"h": np.stack(h), "targets": np.stack(targets), "mask": np.stack(mask)}


@jax.jit
def loss_gradients_and_features(batch, phi):
    """``ℓ_xent``, ``(∂ℓ/∂h, ∂ℓ/∂Φ)`` and the last position's conditional-mean features ``Φ p_f(s)``."""
    loss, (grad_h, grad_phi) = jax.value_and_grad(kernels.xent_loss, argnums=(0, 1))(
        batch["h"], phi, batch["targets"], batch["mask"]
    )
    mean = kernels.conditional_mean_features(batch["h"][:, -1], phi)
    return {"loss": loss, "grad_h": grad_h, "grad_phi": grad_phi, "features": mean}


MULTIHOST_WORDS = ("a", "e", " ")


def multihost_extraction(n_texts: int, seed: int) -> dict[str, np.ndarray]:
    """``f``, ``Φp_f`` and word log-probs of seeded texts under a seeded tiny random GPT-2, via the real pipeline."""
    config = gpt2.gpt2_config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=257)
    lm = gpt2.init(config, seed, tokenizer=tokenizers.byte_tokenizer())
    out = features.extract_features(lm, seeded_texts(n_texts, seed, max_words=12), kinds=("f", "phi_p_f",
                                    "word_log_probs"), words=list(MULTIHOST_WORDS), prompt=" is", batch_size=8,
                                    progress=False)
    return {f"extracted_{kind}": out[kind] for kind in ("f", "phi_p_f", "word_log_probs")}


def checkpoint_round_trip(outputs, directory: Path):
    """Writes ``outputs`` (global arrays) with Orbax from all processes, or restores them if already written,
    and returns what was restored with the same shardings: through the training checkpoints' handler
    (:func:`~sentcomp.training.checkpoints.state_handler`)."""
    checkpointer = ocp.AsyncCheckpointer(checkpoints.state_handler())
    if not directory.exists():
        checkpointer.save(directory, args=checkpoints.save_state_args(outputs))
        checkpointer.wait_until_finished()
    parallel.sync("multihost_check_checkpoint")
    return checkpointer.restore(directory, args=checkpoints.restore_state_args(checkpoints.abstract_state(outputs)))


def multihost_checks(cfg, tolerance, seed: int, workdir: Path) -> list[Check]:
    """The sharded loss step, its checkpoint round trip, the extraction pipeline and ``main_decides``."""
    mesh = parallel.data_mesh()
    local = multihost_rows(parallel.host_row_indices(cfg.n_contexts, mesh), cfg, seed)
    phi = (np.random.default_rng(seed).normal(size=(cfg.vocab_size, cfg.dim)) / np.sqrt(cfg.dim)).astype(np.float32)
    outputs = loss_gradients_and_features(parallel.global_batch(local, mesh), parallel.replicate(phi, mesh))
    restored = checkpoint_round_trip(outputs, workdir / MULTIHOST_CHECKPOINT)
    arrays, restored = parallel.fetch(outputs), parallel.fetch(restored)
    extracted = multihost_extraction(cfg.n_contexts, seed)
    decided_by = parallel.main_decides(jax.process_index)  # what process 0 read is what every process gets
    if parallel.is_main_process():
        np.savez(workdir / MULTIHOST_ARRAYS, allow_pickle=False, **arrays, **extracted)
    what = (f"{cfg.n_contexts}×{cfg.positions} positions, V={cfg.vocab_size}, d={cfg.dim}, over "
            f"{jax.process_count()} process(es), {jax.device_count()} devices")
    return [
        Check("multihost loss", f"xent_loss on the global batch ({what})", float(arrays["loss"])),
        Check("multihost ‖∂ℓ/∂Φ‖", "L2 norm of the loss's gradient with respect to Φ (all-reduced)",
              float(np.linalg.norm(arrays["grad_phi"]))),
        Check("multihost ‖Φp_f‖", "L2 norm of the last positions' conditional-mean features (sharded)",
              float(np.linalg.norm(arrays["features"]))),
        Check("multihost checkpoint", f"arrays restored from {MULTIHOST_CHECKPOINT}/ (Orbax, written by every process) "
              "vs computed, max |Δ|", max(float(np.abs(arrays[k] - restored[k]).max()) for k in arrays),
              tolerance.multihost_checkpoint),
        Check("multihost extraction ‖Φp_f‖", f"L2 norm of extract_features Φp_f ({cfg.n_contexts} texts, tiny GPT-2)",
              float(np.linalg.norm(extracted["extracted_phi_p_f"]))),
        Check("main_decides", "the process whose value parallel.main_decides handed this process (must be 0)",
              float(decided_by), 0.0),
    ]


# ---------------------------------------------------------------------------------------------- throughput


def timed(fn, repeats: int) -> float:
    """The median wall time of ``fn()`` (which waits for its result) over ``repeats`` calls, after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def throughput_checks(lm: LanguageModel, trainer: Trainer, config, mesh) -> list[Check]:
    """Tokens/s and MFU of the forward pass and of a train step, data-parallel over ``mesh``."""
    cfg, dtype = config.throughput, COMPUTE_DTYPES[config.compute_dtype]
    batch = cfg.batch_per_device * mesh.size
    blocks = random_tokens((batch, 1, cfg.seq_len + 1), lm.config.vocab_size, config.seed)
    rows = parallel.host_row_indices(batch, mesh)
    tokens = parallel.global_batch(blocks[rows], mesh)
    inputs = parallel.global_batch(blocks[rows, 0, :-1], mesh)
    params = parallel.replicate(cast_floats(lm.params, dtype), mesh)
    forward = jax.jit(lm.hidden_fn, in_shardings=(parallel.replicated(mesh), *[parallel.batch_sharding(mesh)] * 2))
    mask = jnp.ones_like(inputs)
    forward_seconds = timed(lambda: forward(params, inputs, mask).block_until_ready(), cfg.repeats)

    state = steps.initial_state(jax.device_get(lm.params), trainer.optimizer, mesh)  # donated by the steps

    def train_step():
        nonlocal state
        state, metrics = trainer.step(state, tokens)
        jax.block_until_ready(metrics)

    step_seconds = timed(train_step, cfg.repeats)
    device = jax.local_devices()[0]  # a process can only time (measure the peak of) its own devices
    peak = throughput.peak_flops(device)
    n_tokens = batch * cfg.seq_len
    what = (f"GPT-2 L={lm.config.n_layer}, d={lm.config.n_embd}, {batch}×{cfg.seq_len} tokens, "
            f"{config.compute_dtype}, data-parallel over {mesh.size} device(s)")
    rows_out = []
    for name, seconds, training_flops in (("forward", forward_seconds, False), ("train step", step_seconds, True)):
        speed = n_tokens / seconds
        flops = throughput.lm_flops_per_token(lm, cfg.seq_len, training=training_flops,
                                              output_projection=training_flops)
        rows_out += [Check(f"{name} tokens/s", what, speed),
                     Check(f"{name} MFU", f"model FLOPs/s over peak {peak:.3g} FLOP/s per device "
                           f"({'datasheet' if throughput.table_peak(device.device_kind) else 'measured'})",
                           throughput.mfu(speed, flops, peak, mesh.size))]
    return rows_out


# ------------------------------------------------------------------------------------------------- the run


def format_table(info: dict[str, Any], checks: list[Check]) -> str:
    """The Markdown report: the device line, then one row per check."""
    head = ", ".join(f"{key} {value}" for key, value in info.items())
    rows = ([check.name, check.compared, f"{check.value:.3g}",
             "finite" if check.tolerance is None else f"{check.tolerance:g}", "PASS" if check.passed else "FAIL"]
            for check in checks)
    return f"Device: {head}\n\n" + markdown_table(["check", "compared", "value", "tolerance", "result"], rows) + "\n"


def check_config(config) -> None:
    """The groups exist, the dtype is known, the sizes of the groups that run are ≥ 1 (before any work)."""
    unknown = sorted(set(config.checks) - set(CHECKS))
    if unknown or not config.checks:
        raise SentcompError(f"config.checks must be a non-empty subset of {CHECKS}, got {tuple(config.checks)}.")
    if config.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
        raise SentcompError(f"config.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                            f"got {config.compute_dtype!r}.")
    if "pretraining" in config.checks and not 0 < config.pretraining.checkpoint_step < config.pretraining.num_steps:
        raise SentcompError("config.pretraining.checkpoint_step must be between 0 and num_steps (exclusive).")
    for group, sizes in (("identities", ("vocab_size", "dim", "n_contexts")),
                         ("multihost", ("n_contexts", "positions", "vocab_size", "dim"))):
        if group in config.checks:
            check_sizes(config, *(f"{group}.{size}" for size in sizes))


def run_checks(config, workdir: Path) -> list[Check]:
    """Every group of ``config.checks``, in the order of :data:`CHECKS` (each builds only what it uses)."""
    mesh = parallel.data_mesh()
    small = functools.cache(lambda: random_gpt2(config.small_model, config.seed))
    large = functools.cache(lambda: small() if config.model == config.small_model
                            else random_gpt2(config.model, config.seed))
    trainer = functools.cache(lambda lm: Trainer.build(lm, config, mesh))  # one compiled step per model
    groups = {
        "kernels": lambda: kernel_checks(config.kernels, config.tolerance, config.seed),
        "identities": lambda: identity_checks(config.identities, config.tolerance, config.seed),
        "forward": lambda: [forward_check(large(), config.forward, config.compute_dtype, config.tolerance,
                                          config.seed)],
        "probe": lambda: probe_checks(config.probe, config.tolerance, config.seed),
        "pretraining": lambda: pretraining_checks(small(), trainer(small()), config, mesh, workdir / SCRATCH),
        "features": lambda: [features_check(small(), config.features, config.tolerance, config.seed)],
        "multihost": lambda: multihost_checks(config.multihost, config.tolerance, config.seed, workdir),
        "throughput": lambda: throughput_checks(large(), trainer(large()), config, mesh),
    }
    return [check for name in CHECKS if name in config.checks for check in groups[name]()]


def run(config, workdir) -> dict[str, Any]:
    """Runs the checks, prints the table, writes results.md and results.json; raises if any check failed.
    Returns the device, ``passed``, the number of checks and each check's value by name (the headline of
    ``done.json``, and a sweep's metrics)."""
    check_config(config)
    workdir = Path(workdir).resolve()
    info = device_info()
    began = time.perf_counter()
    checks = run_checks(config, workdir)
    failed = [check.name for check in checks if not check.passed]
    table = format_table(info, checks)
    print(table, flush=True)
    if parallel.is_main_process():
        storage.write_text(workdir / layout.RESULTS_MARKDOWN, table)
        storage.write_json(workdir / layout.RESULTS_FILE, {**info, "seconds": time.perf_counter() - began,
                                                    "passed": not failed, "failed": failed,
                                                    "checks": [check.to_json() for check in checks]})
    if failed:
        raise SentcompError(f"Device check failed: {', '.join(failed)} (outside the tolerance; see "
                            f"{workdir / layout.RESULTS_MARKDOWN}).")
    return {**info, "passed": True, "checks": len(checks), **{check.name: check.value for check in checks}}
