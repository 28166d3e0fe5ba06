"""Kernels vs the paper code's materialised forms, at GPT-2 shapes (d=768, V=50,257), side by side in one run.

    .venv/bin/python benchmarks/kernels.py            # the issue's sizes (several minutes, ~8 GB RAM)
    .venv/bin/python benchmarks/kernels.py --quick    # smaller N, for a fast look

1. ``quad_loss`` value + gradients (w.r.t. h and Φ): Gram trick (V·d² once) vs materialised [N, V] logits
   (N·V·d), the form the authors' code uses, for a range of N; prints time and peak-memory ratios and the
   N where the two cross.
2. ``conditional_mean_features`` (streamed over V) vs ``scipy.special.softmax`` of the whole [N, V] logit
   matrix followed by a numpy matmul, as the authors' code does.

Each measurement runs in a fresh subprocess. Memory counts the bytes the computation allocates besides its
inputs: for JAX the compiled program's temporaries + outputs (``memory_analysis()``; "scratch" = temporaries
alone: for Quad the outputs, chiefly the [V, d] gradient of Φ = 147 MiB, are the same on both sides); for
numpy its peak traced allocation (tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc

D, V = 768, 50_257


def _time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up (compilation) call."""
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return min(times)


def _xla_bytes(compiled) -> dict:
    """Bytes a compiled XLA program allocates besides its inputs: scratch (temporaries) and scratch + outputs."""
    analysis = compiled.memory_analysis()
    scratch = analysis.temp_size_in_bytes
    return {"scratch_bytes": scratch, "peak_bytes": scratch + analysis.output_size_in_bytes}


def _numpy_peak_bytes(fn) -> int:
    """Peak bytes numpy allocates during ``fn()`` (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _inputs(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    h = (rng.normal(size=(n, D)) * 0.1).astype(np.float32)
    phi = (rng.normal(size=(V, D)) * 0.02).astype(np.float32)
    targets = rng.integers(0, V, size=n)
    mask = np.ones(n, bool)
    return h, phi, targets, mask


def _case_quad(variant: str, n: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from sentcomp import kernels

    def materialised(h, phi, targets, mask):
        logits = h @ phi.T  # [N, V]: the paper code's form
        picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return kernels.masked_mean(-picked + 0.5 * jnp.sum(logits**2, axis=-1), mask)

    loss = kernels.quad_loss if variant == "ours" else materialised
    args = [jax.device_put(x) for x in _inputs(n)]
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return {"seconds": _time(lambda: jax.block_until_ready(step(*args)), repeats), **_xla_bytes(step)}


def _case_mean(variant: str, n: int, repeats: int) -> dict:
    h, phi, _, _ = _inputs(n)
    if variant == "ours":
        import jax

        from sentcomp import kernels

        h_dev, phi_dev = jax.device_put(h), jax.device_put(phi)
        features = jax.jit(kernels.conditional_mean_features).lower(h_dev, phi_dev).compile()
        return {"seconds": _time(lambda: jax.block_until_ready(features(h_dev, phi_dev)), repeats),
                **_xla_bytes(features)}
    from scipy.special import softmax

    def reference():
        return softmax(h @ phi.T, axis=-1) @ phi

    return {"seconds": _time(reference, repeats), "peak_bytes": _numpy_peak_bytes(reference)}


def _run_case(case: str, variant: str, n: int, repeats: int) -> dict:
    """Runs one measurement in a fresh interpreter so peak RSS belongs to it alone."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import kernels as b; "
        f"print(json.dumps(b._case_{case}({variant!r}, {n}, {repeats})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(ours: dict, ref: dict, key: str) -> str:
    return f"{ref[key] / max(ours[key], 1):.1f}×"


def _row(label: str, ours: dict, ref: dict) -> str:
    cells = [
        f"{ours['seconds']*1e3:,.0f}",
        f"{ref['seconds']*1e3:,.0f}",
        _ratio(ours, ref, "seconds"),
        f"{ours['peak_bytes']/2**20:,.1f}",
        f"{ref['peak_bytes']/2**20:,.1f}",
        _ratio(ours, ref, "peak_bytes"),
    ]
    if "scratch_bytes" in ref:
        cells += [f"{ours['scratch_bytes']/2**20:,.1f}", f"{ref['scratch_bytes']/2**20:,.1f}",
                  _ratio(ours, ref, "scratch_bytes")]
    return f"| {label} | " + " | ".join(cells) + " |"


def _header(what: str, with_scratch: bool) -> str:
    header = f"| {what} | ours ms | reference ms | speed-up | ours peak MiB | reference peak MiB | memory ratio |"
    if with_scratch:
        header += " ours scratch MiB | reference scratch MiB | scratch ratio |"
    return header + "\n" + "|---" * (header.count("|") - 1) + "|"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N (fast look, not the issue's sizes)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    quad_ns = [128, 256, 512, 1024, 2048] + ([] if args.quick else [16_384])
    mean_n = 1024 if args.quick else 8192

    print(f"quad_loss value + grads (h, Φ), d={D}, V={V:,}: Gram trick vs materialised [N, V] logits")
    print(_header("N positions", with_scratch=True))
    crossover = None
    for n in quad_ns:
        ours, ref = _run_case("quad", "ours", n, args.repeats), _run_case("quad", "materialised", n, args.repeats)
        print(_row(f"{n:,}", ours, ref), flush=True)
        if crossover is None and ours["seconds"] < ref["seconds"]:
            crossover = n
    print(f"time crossover: ours is faster from N = {crossover} on (of those measured)\n")

    print(f"conditional_mean_features, N={mean_n:,}: streamed over V vs scipy softmax + numpy matmul")
    print(_header("N contexts", with_scratch=False))
    print(_row(f"{mean_n:,}", _run_case("mean", "ours", mean_n, args.repeats),
               _run_case("mean", "scipy", mean_n, args.repeats)))


if __name__ == "__main__":
    main()
