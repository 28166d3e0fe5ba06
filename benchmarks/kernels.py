"""Kernels vs the paper code's materialised forms, at GPT-2 shapes (d=768, V=50,257), side by side in one run.

    .venv/bin/python benchmarks/kernels.py            # the issue's sizes (several minutes, ~8 GB RAM)
    .venv/bin/python benchmarks/kernels.py --quick    # smaller N, for a fast look

1. ``quad_loss`` value + gradients (w.r.t. h and Φ): Gram trick (V·d² once) vs materialised [N, V] logits
   (N·V·d), the form the authors' code uses, written in jnp and compiled the same way, for a range of N;
   prints time and memory ratios and the N where the two cross.
2. ``conditional_mean_features`` (streamed over V) vs the materialised softmax of the whole [N, V] logit
   matrix followed by a matmul: in jnp (compiled, the like-for-like reference for time and memory) and with
   ``scipy.special.softmax`` + numpy, as the authors' code does (time only).
3. One batch's V-wide feature kinds as extraction computes them (Φp_f, log Z and 20 words' log-probabilities of
   ``--rows`` feature vectors, default 32: a batch's last positions) streamed in ``DEFAULT_VOCAB_CHUNK``-word
   chunks vs in the chunk :func:`sentcomp.kernels.vocab_chunk_for` picks (the whole vocabulary when the
   ``[rows, V]`` logits fit its budget).

Before any ratio is printed, ours and each reference must give the same outputs (the loss value and both
gradients; the features) within the tolerance printed with them (``timing.assert_same_output``). Both sides
are timed alike (``timing.time_calls``: one warm-up call, then the median of ``--repeats`` calls, JAX outputs
waited for). Memory is XLA's own account of each compiled program (``memory_analysis()``), the same on both
sides: "peak" = temporaries + outputs (for Quad the outputs, chiefly the [V, d] gradient of Φ = 147 MiB, are
the same on both sides), "scratch" = temporaries alone. The numpy reference's memory is not measured: numpy has
no account comparable to XLA's (its float32 [N, V] buffers are N·V·4 bytes each, printed as a computed size,
not a measurement).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import assert_same_output, format_ratio, speedup, time_calls, xla_bytes

from sentcomp import kernels

D, V = 768, 50_257
# max|ours − reference| ≤ rtol · max|reference| per output: float32 sums over V = 50,257 terms in other orders
QUAD_TOLERANCE = {"rtol": 1e-4}
MEAN_TOLERANCE = {"rtol": 1e-4}


def inputs(n: int, dim: int = D, vocab: int = V, seed: int = 0):
    """``h [n, d]`` (scale 0.1), ``phi [V, d]`` (scale 0.02, GPT-2's init), target ids and an all-true mask."""
    rng = np.random.default_rng(seed)
    h = (rng.normal(size=(n, dim)) * 0.1).astype(np.float32)
    phi = (rng.normal(size=(vocab, dim)) * 0.02).astype(np.float32)
    return h, phi, rng.integers(0, vocab, size=n).astype(np.int32), np.ones(n, bool)


def materialised_quad(h, phi, targets, mask):
    """The paper code's Quad: ``[N, V]`` logits, then ``−logit_w + ½ Σ_v logit_v²``, masked mean."""
    logits = jnp.dot(h, phi.T, precision="highest")
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return kernels.masked_mean(-picked + 0.5 * jnp.sum(logits**2, axis=-1), mask)


def materialised_xent(h, phi, targets, mask):
    """Cross-entropy through the whole ``[N, V]`` log-softmax, masked mean."""
    log_p = jax.nn.log_softmax(jnp.dot(h, phi.T, precision="highest"), axis=-1)
    return kernels.masked_mean(-jnp.take_along_axis(log_p, targets[:, None], axis=-1)[:, 0], mask)


def materialised_mean(h, phi):
    """``softmax(h Φᵀ) Φ`` through the whole ``[N, V]`` probability matrix."""
    return jnp.dot(jax.nn.softmax(jnp.dot(h, phi.T, precision="highest"), axis=-1), phi, precision="highest")


def scipy_mean(h, phi):
    """The authors' code: scipy's softmax of the whole float32 [N, V] logit matrix, then a numpy matmul."""
    from scipy.special import softmax

    return softmax(h @ phi.T, axis=-1) @ phi


def measure_compiled(fn, args, repeats: int) -> dict:
    """Compiles ``fn`` for ``args``; its output, timing (warm-up + median) and XLA memory account."""
    compiled = jax.jit(fn).lower(*args).compile()
    return {"output": compiled(*args), "seconds": time_calls(lambda: compiled(*args), repeats).median,
            **xla_bytes(compiled)}


def compare_quad(n: int, repeats: int, dim: int = D, vocab: int = V) -> dict:
    """Ours vs the materialised Quad loss (value + gradients w.r.t. h and Φ), checked equal, then measured."""
    args = [jax.device_put(x) for x in inputs(n, dim, vocab)]
    ours, reference = (measure_compiled(jax.value_and_grad(loss, argnums=(0, 1)), args, repeats)
                       for loss in (kernels.quad_loss, materialised_quad))
    assert_same_output(f"quad_loss at N={n}", ours.pop("output"), reference.pop("output"), **QUAD_TOLERANCE)
    return {"ours": ours, "reference": reference}


def compare_mean(n: int, repeats: int, dim: int = D, vocab: int = V) -> dict:
    """Ours vs the materialised jnp form (time and memory) and vs scipy + numpy (time), checked equal first."""
    h, phi, _, _ = inputs(n, dim, vocab)
    args = [jax.device_put(h), jax.device_put(phi)]
    ours = measure_compiled(kernels.conditional_mean_features, args, repeats)
    reference = measure_compiled(materialised_mean, args, repeats)
    scipy_output = scipy_mean(h, phi)
    assert_same_output(f"conditional_mean_features at N={n} vs jnp", ours["output"], reference.pop("output"),
                       **MEAN_TOLERANCE)
    assert_same_output(f"conditional_mean_features at N={n} vs scipy", ours.pop("output"), scipy_output,
                       **MEAN_TOLERANCE)
    scipy_seconds = time_calls(lambda: scipy_mean(h, phi), repeats).median
    return {"ours": ours, "reference": reference, "scipy_seconds": scipy_seconds}


def compare_chunks(rows: int, repeats: int, dim: int = D, vocab: int = V) -> dict:
    """The extraction's V-wide kinds of ``rows`` features in the chunk ``vocab_chunk_for`` picks vs in
    ``DEFAULT_VOCAB_CHUNK``-word chunks, checked equal, then measured."""
    h, phi, _, _ = inputs(rows, dim, vocab)
    words = jnp.arange(20)

    def kinds(chunk):
        return lambda h, phi: (kernels.conditional_mean_features(h, phi, chunk), kernels.log_partition(h, phi, chunk),
                               kernels.word_log_probs(h, phi, words, chunk))

    args = [jax.device_put(h), jax.device_put(phi)]
    chosen = kernels.vocab_chunk_for(rows, vocab)
    ours = measure_compiled(kinds(chosen), args, repeats)
    reference = measure_compiled(kinds(kernels.softmax_features.DEFAULT_VOCAB_CHUNK), args, repeats)
    assert_same_output(f"feature kinds of {rows} rows", ours.pop("output"), reference.pop("output"), **MEAN_TOLERANCE)
    return {"ours": ours, "reference": reference, "chunk": chosen}


def row(label: str, ours: dict, reference: dict) -> str:
    cells = [f"{ours['seconds'] * 1e3:,.0f}", f"{reference['seconds'] * 1e3:,.0f}",
             format_ratio(speedup(reference["seconds"], ours["seconds"]))]
    for key in ("peak_bytes", "scratch_bytes"):
        cells += [f"{ours[key] / 2**20:,.1f}", f"{reference[key] / 2**20:,.1f}",
                  format_ratio(reference[key] / max(ours[key], 1))]
    return f"| {label} | " + " | ".join(cells) + " |"


HEADER = ("| {what} | ours ms | reference ms | speed-up | ours peak MiB | reference peak MiB | memory ratio | "
          "ours scratch MiB | reference scratch MiB | scratch ratio |\n" + "|---" * 10 + "|")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N (fast look, not the issue's sizes)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median reported)")
    parser.add_argument("--rows", type=int, default=32, help="3.: feature vectors per batch (extraction's batch)")
    parser.add_argument("--only-chunks", action="store_true", help="run part 3 only")
    args = parser.parse_args()

    if not args.only_chunks:
        compare_losses_and_means(args)
    result = compare_chunks(args.rows, args.repeats)
    print(f"\nfeature kinds (Φp_f, log Z, 20 words' log-probs) of {args.rows} rows: one chunk of "
          f"{result['chunk']:,} words (vocab_chunk_for) vs {kernels.softmax_features.DEFAULT_VOCAB_CHUNK:,}-word "
          f"chunks; outputs equal within {MEAN_TOLERANCE}")
    print(HEADER.format(what="rows"))
    print(row(f"{args.rows:,}", result["ours"], result["reference"]))


def compare_losses_and_means(args) -> None:
    """Parts 1 and 2, printed."""
    quad_ns = [128, 256, 512, 1024, 2048] + ([] if args.quick else [16_384])
    mean_n = 1024 if args.quick else 8192

    print(f"quad_loss value + grads (h, Φ), d={D}, V={V:,}: Gram trick vs materialised [N, V] logits (jnp); "
          f"outputs equal within {QUAD_TOLERANCE}; median of {args.repeats} after a warm-up")
    print(HEADER.format(what="N positions"))
    crossover = None
    for n in quad_ns:
        result = compare_quad(n, args.repeats)
        print(row(f"{n:,}", result["ours"], result["reference"]), flush=True)
        if crossover is None and result["ours"]["seconds"] < result["reference"]["seconds"]:
            crossover = n
    print(f"time crossover: ours is faster from N = {crossover} on (of those measured)\n" if crossover
          else "time crossover: ours was not faster at any N measured\n")

    print(f"conditional_mean_features, N={mean_n:,}: streamed over V vs materialised softmax (jnp); outputs equal "
          f"within {MEAN_TOLERANCE}")
    print(HEADER.format(what="N contexts"))
    result = compare_mean(mean_n, args.repeats)
    print(row(f"{mean_n:,}", result["ours"], result["reference"]))
    print(f"scipy softmax + numpy matmul (the authors' code, same outputs): {result['scipy_seconds'] * 1e3:,.0f} ms, "
          f"{format_ratio(speedup(result['scipy_seconds'], result['ours']['seconds']))} ours' time; memory not "
          f"measured (its float32 [N, V] softmax alone is {mean_n * V * 4 / 2**20:,.0f} MiB, computed)")


if __name__ == "__main__":
    main()
