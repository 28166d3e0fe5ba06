"""What every benchmark shares, so both sides of a comparison are measured and checked the same way.

* :func:`time_calls`: one warm-up call (compilation, allocator, worker start-up), timed apart, then the median
  wall time of ``repeats`` calls, waiting for JAX outputs (``jax.block_until_ready``) inside the timed region;
  used for ours and the reference alike.
* :func:`speedup`: ``reference / ours``, unclamped (a time under one second is a time like any other).
* :func:`assert_same_output`: ours and the reference agree within a stated tolerance (relative to each output's
  largest magnitude), checked before any ratio is printed, so a fast wrong answer cannot pass as a speed-up.
* :func:`cores`: the CPU cores this process may use, which XLA's CPU client uses; scikit-learn gets as many
  (``n_jobs``).
* :func:`xla_bytes`: XLA's own account of a compiled program's memory, for comparisons between two compiled
  JAX programs (the same accounting on both sides).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

DEFAULT_REPEATS = 3


class Timing(NamedTuple):
    """``first``: the first call (compilation, worker start-up); ``median``: the median of the later calls."""

    first: float
    median: float


def time_calls(fn: Callable[[], Any], repeats: int = DEFAULT_REPEATS) -> Timing:
    """Times one warm-up call of ``fn``, then ``repeats`` calls whose median is the figure compared; JAX results
    are waited for (``jax.block_until_ready``) inside the timed region."""
    import jax

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return Timing(times[0], statistics.median(times[1:]))


def speedup(reference_seconds: float, ours_seconds: float) -> float:
    """How many times faster ours is: ``reference_seconds / ours_seconds``."""
    if ours_seconds <= 0 or reference_seconds <= 0:
        raise ValueError(f"times must be positive; got ours {ours_seconds!r} s, reference {reference_seconds!r} s.")
    return reference_seconds / ours_seconds


def format_ratio(ratio: float) -> str:
    return f"{ratio:.1f}×" if ratio >= 0.95 else f"{ratio:.2f}×"


def assert_same_output(what: str, ours, reference, *, rtol: float, atol: float = 0.0) -> float:
    """Every array leaf of ``ours`` matches the same leaf of ``reference``: ``max|ours − ref| ≤ atol + rtol ·
    max|ref|`` (relative to the leaf's scale, so near-zero entries of a gradient are held to the same absolute
    standard as its large ones), or an ``AssertionError`` naming ``what``. Returns the largest ``max|ours − ref|
    / max|ref|`` over the leaves."""
    import jax
    import numpy as np

    ours_leaves, reference_leaves = jax.tree.leaves(ours), jax.tree.leaves(reference)
    if len(ours_leaves) != len(reference_leaves):
        raise AssertionError(f"{what}: {len(ours_leaves)} outputs vs the reference's {len(reference_leaves)}.")
    worst = 0.0
    for index, (got, want) in enumerate(zip(ours_leaves, reference_leaves)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            raise AssertionError(f"{what}: output {index} has shape {got.shape}, the reference's {want.shape}.")
        if not got.size:
            continue
        scale = float(np.max(np.abs(want)))
        difference = float(np.max(np.abs(got - want)))  # NaN anywhere makes it NaN, which fails below
        if not difference <= atol + rtol * scale:
            raise AssertionError(f"{what}: output {index} differs from the reference by up to {difference:.3g} "
                                 f"(its largest magnitude {scale:.3g}); allowed {atol:g} + {rtol:g} × {scale:.3g}.")
        worst = max(worst, difference / scale if scale else difference)
    return worst


def cores() -> int:
    """CPU cores this process may run on (its affinity mask): what XLA's CPU client uses."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def xla_bytes(compiled) -> dict[str, int]:
    """Bytes a compiled XLA program allocates besides its inputs: ``scratch`` (temporaries) and ``peak``
    (temporaries + outputs), from ``compiled.memory_analysis()``."""
    analysis = compiled.memory_analysis()
    return {"scratch_bytes": int(analysis.temp_size_in_bytes),
            "peak_bytes": int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)}


def load_average() -> str:
    """The 1-minute load average (the machine may be shared: printed next to each timing)."""
    return f"load {os.getloadavg()[0]:.1f}"
