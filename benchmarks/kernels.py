"""Kernels vs the paper code's materialised forms, at GPT-2 shapes (d=768, V=50,257), side by side in one run.

    .venv/bin/python benchmarks/kernels.py            # the issue's sizes (several minutes, ~8 GB RAM)
    .venv/bin/python benchmarks/kernels.py --quick    # smaller N, for a fast look

1. ``quad_loss`` value + gradients (w.r.t. h and Φ): Gram trick (V·d² once) vs materialised [N, V] logits
   (N·V·d), the form the authors' code uses, for a range of N; prints time and peak-memory ratios and the
   N where the two cross.
2. ``conditional_mean_features`` (streamed over V) vs ``scipy.special.softmax`` of the whole [N, V] logit
   matrix followed by a numpy matmul, as the authors' code does.

Each measurement runs in a fresh subprocess. "Peak RSS" is the rise of the process's RSS high-water mark
during the timed calls over its RSS just before them (inputs allocated, warm-up/compilation done and
excluded); it includes the outputs (for Quad the [V, d] gradient of Φ, 147 MiB, is the same on both sides),
so both sides are measured the same way. For the two JAX variants, "XLA scratch" is the compiled program's
temporary buffers alone (inputs and outputs excluded) from ``memory_analysis()``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

D, V = 768, 50_257


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> None:
    """Resets the kernel's high-water mark of this process's RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _measure(fn, repeats: int) -> dict:
    """Runs ``fn`` once (compile/warm-up), then ``repeats`` times: best time, and the peak RSS rise of the timed
    calls over the RSS before them (the high-water mark is reset after warm-up, so compilation is excluded)."""
    fn()
    baseline = _rss_bytes()
    _reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_bytes": max(_peak_rss_bytes() - baseline, 0)}


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
    buffers = step.memory_analysis()
    result = _measure(lambda: jax.block_until_ready(step(*args)), repeats)
    return {**result, "xla_temp_bytes": buffers.temp_size_in_bytes}


def _case_mean(variant: str, n: int, repeats: int) -> dict:
    h, phi, _, _ = _inputs(n)
    if variant == "ours":
        import jax

        from sentcomp import kernels

        features = jax.jit(kernels.conditional_mean_features)
        h_dev, phi_dev = jax.device_put(h), jax.device_put(phi)
        return _measure(lambda: jax.block_until_ready(features(h_dev, phi_dev)), repeats)
    from scipy.special import softmax

    return _measure(lambda: softmax(h @ phi.T, axis=-1) @ phi, repeats)


def _run_case(case: str, variant: str, n: int, repeats: int) -> dict:
    """Runs one measurement in a fresh interpreter so peak RSS belongs to it alone."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import kernels as b; "
        f"print(json.dumps(b._case_{case}({variant!r}, {n}, {repeats})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(label: str, ours: dict, ref: dict) -> str:
    cells = [
        f"{ours['seconds']*1e3:,.0f}",
        f"{ref['seconds']*1e3:,.0f}",
        f"{ref['seconds'] / ours['seconds']:.1f}×",
        f"{ours['peak_bytes']/2**20:,.0f}",
        f"{ref['peak_bytes']/2**20:,.0f}",
        f"{ref['peak_bytes'] / max(ours['peak_bytes'], 1):.1f}×",
    ]
    if "xla_temp_bytes" in ours:
        cells += [
            f"{ours['xla_temp_bytes']/2**20:,.1f}",
            f"{ref['xla_temp_bytes']/2**20:,.1f}",
            f"{ref['xla_temp_bytes'] / ours['xla_temp_bytes']:.1f}×",
        ]
    return f"| {label} | " + " | ".join(cells) + " |"


HEADER = (
    "| {what} | ours ms | reference ms | speed-up | ours peak RSS MiB | reference peak RSS MiB | RSS ratio |"
)
XLA_COLUMNS = " ours XLA scratch MiB | reference XLA scratch MiB | scratch ratio |"


def _header(what: str, with_xla: bool) -> str:
    header = HEADER.format(what=what) + (XLA_COLUMNS if with_xla else "")
    return header + "\n" + "|---" * (header.count("|") - 1) + "|"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller N (fast look, not the issue's sizes)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    quad_ns = [128, 256, 512, 1024, 2048] + ([] if args.quick else [16_384])
    mean_n = 1024 if args.quick else 8192

    print(f"quad_loss value + grads (h, Φ), d={D}, V={V:,}: Gram trick vs materialised [N, V] logits")
    print(_header("N positions", with_xla=True))
    crossover = None
    for n in quad_ns:
        ours, ref = _run_case("quad", "ours", n, args.repeats), _run_case("quad", "materialised", n, args.repeats)
        print(_row(f"{n:,}", ours, ref), flush=True)
        if crossover is None and ours["seconds"] < ref["seconds"]:
            crossover = n
    print(f"time crossover: ours is faster from N = {crossover} on (of those measured)\n")

    print(f"conditional_mean_features, N={mean_n:,}: streamed over V vs scipy softmax + numpy matmul")
    print(_header("N contexts", with_xla=False))
    print(_row(f"{mean_n:,}", _run_case("mean", "ours", mean_n, args.repeats),
               _run_case("mean", "scipy", mean_n, args.repeats)))


if __name__ == "__main__":
    main()
