"""Checks a multi-host setup: the kernels on a globally sharded batch give the numbers one process gives.

Every process builds the same seeded random softmax model (output embeddings Φ ``[V, d]``, replicated) and
generates only its own rows of a seeded batch of contexts (:func:`sentcomp.parallel.host_row_indices`; row
``i`` depends on ``(seed, i)`` alone, so any process layout sees the same global batch). One jitted step over
the global mesh computes

* the cross-entropy ``ℓ_xent = E_{(s,w)}[log Z(f(s)) − f(s)ᵀφ_w]`` over masked positions and its gradients
  with respect to the features ``h`` (sharded like the batch) and Φ (a sum over every host's rows: a
  cross-host all-reduce);
* the conditional-mean features ``Φ p_f(s)`` at each context's last position (sharded);

and the real feature-extraction pipeline (:func:`sentcomp.features.extract_features`: tokenisation, prompt,
length buckets, data-parallel forward passes) runs a seeded tiny random GPT-2 (byte-level tokenizer) over a
few seeded texts, giving ``f(s)``, ``Φ p_f(s)`` and word log-probabilities.

The arrays are written to ``arrays.npz`` and round-tripped through an Orbax checkpoint that all processes
write together (``checkpoint/``); on a re-run the checkpoint is restored instead of written (resume).
Every process also checks that :func:`sentcomp.parallel.main_decides` (how programs read what their workdir
holds) hands it process 0's value. ``results.json`` holds the headline numbers. Run it on a new Cloud TPU
slice before a real experiment (tpu_configs/README.md); tests/test_multihost.py runs it as 2 processes × 4
CPU devices and compares with 1 process × 8 devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from sentcomp import features, kernels, parallel
from sentcomp.errors import check_sizes
from sentcomp.models import gpt2, tokenizers
from sentcomp.results import storage

EXTRACTION_WORDS = ("a", "e", " ")


def output_embeddings(vocab_size: int, dim: int, seed: int) -> np.ndarray:
    """The model's Φ ``[V, d]``, identical on every process."""
    return (np.random.default_rng(seed).normal(size=(vocab_size, dim)) / np.sqrt(dim)).astype(np.float32)


def load_rows(rows: np.ndarray, positions: int, vocab_size: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Rows ``rows`` of the global batch: features ``h [n, T, d]``, next-word ``targets [n, T]``, ``mask [n, T]``.

    Row ``i`` is drawn from ``default_rng((seed, i))``, so a process generates only the rows it holds.
    """
    h, targets, mask = [], [], []
    for row in rows:
        rng = np.random.default_rng((seed, int(row)))
        h.append(rng.normal(size=(positions, dim)).astype(np.float32))
        targets.append(rng.integers(vocab_size, size=positions).astype(np.int32))
        mask.append(np.arange(positions) < rng.integers(1, positions + 1))  # right padding
    return {"h": np.stack(h), "targets": np.stack(targets), "mask": np.stack(mask)}


@jax.jit
def loss_gradients_and_features(batch, phi):
    """``ℓ_xent``, ``(∂ℓ/∂h, ∂ℓ/∂Φ)`` and the last position's conditional-mean features ``Φ p_f(s)``."""
    loss, (grad_h, grad_phi) = jax.value_and_grad(kernels.xent_loss, argnums=(0, 1))(
        batch["h"], phi, batch["targets"], batch["mask"]
    )
    features = kernels.conditional_mean_features(batch["h"][:, -1], phi)
    return {"loss": loss, "grad_h": grad_h, "grad_phi": grad_phi, "features": features}


def seeded_texts(n: int, seed: int) -> list[str]:
    """``n`` texts of random lowercase words, identical on every process."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return [" ".join("".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(rng.integers(2, 12)))
            for _ in range(n)]


def extracted_features(n_texts: int, seed: int) -> dict[str, np.ndarray]:
    """``f``, ``Φp_f`` and word log-probs of seeded texts under a seeded tiny random GPT-2, via the real pipeline."""
    config = gpt2.gpt2_config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=257)
    lm = gpt2.init(config, seed, tokenizer=tokenizers.byte_tokenizer())
    out = features.extract_features(lm, seeded_texts(n_texts, seed), kinds=("f", "phi_p_f", "word_log_probs"),
                                    words=list(EXTRACTION_WORDS), prompt=" is", batch_size=8, progress=False)
    return {f"extracted_{kind}": out[kind] for kind in ("f", "phi_p_f", "word_log_probs")}


def checkpoint_round_trip(outputs, directory: Path):
    """Writes ``outputs`` (global arrays) with Orbax from all processes, or restores them if already written,
    and returns what was restored with the same shardings."""
    checkpointer = ocp.StandardCheckpointer()
    if not directory.exists():
        checkpointer.save(directory, outputs)
        checkpointer.wait_until_finished()
    parallel.sync("multihost_check_checkpoint")
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), outputs)
    return checkpointer.restore(directory, target)


def check_config(config) -> None:
    """The sizes must be ≥ 1 (checked by the launcher before it claims the workdir)."""
    check_sizes(config, "n_contexts", "positions", "vocab_size", "dim")


def run(config, workdir: Path) -> dict[str, float]:
    workdir = Path(workdir).resolve()
    mesh = parallel.data_mesh()
    rows = parallel.host_row_indices(config.n_contexts, mesh)
    local = load_rows(rows, config.positions, config.vocab_size, config.dim, config.seed)
    phi = parallel.replicate(output_embeddings(config.vocab_size, config.dim, config.seed), mesh)
    outputs = loss_gradients_and_features(parallel.global_batch(local, mesh), phi)
    restored = checkpoint_round_trip(outputs, workdir / "checkpoint")
    arrays, restored = parallel.fetch(outputs), parallel.fetch(restored)
    extracted = extracted_features(config.n_contexts, config.seed)
    decided_by = parallel.main_decides(jax.process_index)  # what process 0 read is what every process gets
    if decided_by != 0:
        raise RuntimeError(f"parallel.main_decides gave process {jax.process_index()} the value of process "
                           f"{decided_by}, not process 0's.")
    results = {
        "loss": float(arrays["loss"]),
        "grad_phi_norm": float(np.linalg.norm(arrays["grad_phi"])),
        "features_norm": float(np.linalg.norm(arrays["features"])),
        "checkpoint_max_abs_diff": max(float(np.abs(arrays[k] - restored[k]).max()) for k in arrays),
        "extracted_phi_p_f_norm": float(np.linalg.norm(extracted["extracted_phi_p_f"])),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
    }
    if parallel.is_main_process():
        np.savez(workdir / "arrays.npz", **arrays, **extracted)
        storage.write_json(workdir / "results.json", results)
    print(json.dumps(results))
    return results
