"""Where a run's time goes: wall time and XLA compilations per named part, and JAX's persistent compilation cache.

A program wraps each part of its work in :func:`part` inside one :func:`recording`::

    with timings.recording() as record:
        with timings.part("load"):
            lm = models.load(...)
        with timings.part("features task*"):
            ...
    results["timings"] = record.to_json()

Each part gets its wall seconds and the XLA compilations that happened during it (counted from
``jax.monitoring``'s ``/jax/core/compile/backend_compile_duration`` events, one per program compiled *or loaded
from the persistent cache* (JAX 0.10 times both under that event), with their seconds; the loaded ones are also
counted in ``cache_hits``, with the compile seconds JAX says they saved).
A part entered again (a second pass of the same kind) accumulates. Outside a recording, :func:`part` does
nothing, so library code may mark its parts unconditionally.

:func:`enable_compilation_cache` points JAX's persistent compilation cache (programs keyed as JAX keys them:
the computation, compile options, JAX/XLA versions and devices) at ``~/.cache/sentcomp/xla`` (or
``$XDG_CACHE_HOME/sentcomp/xla``; ``SENTCOMP_XLA_CACHE=<dir>`` elsewhere, ``SENTCOMP_XLA_CACHE=off`` not at
all; a ``JAX_COMPILATION_CACHE_DIR`` already set wins), so a second run, or a resumed one, loads its compiled
programs instead of compiling them again. :func:`set_cpu_defaults` picks XLA:CPU's faster compiler path and one
device per core for the command line's runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"
CACHE_ENV = "SENTCOMP_XLA_CACHE"
CACHE_OFF = ("off", "0", "false", "no")


@dataclasses.dataclass
class Counts:
    """Totals since the process started (or a difference of two snapshots)."""

    compilations: int = 0
    compile_seconds: float = 0.0
    cache_hits: int = 0
    cache_saved_seconds: float = 0.0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


_TOTALS = Counts()
_LISTENING = False


def _on_duration(event: str, duration_secs: float, **_) -> None:
    if event == COMPILE_EVENT:
        _TOTALS.compilations += 1
        _TOTALS.compile_seconds += duration_secs
    elif event == CACHE_SAVED_EVENT:
        _TOTALS.cache_saved_seconds += duration_secs


def _on_event(event: str, **_) -> None:
    if event == CACHE_HIT_EVENT:
        _TOTALS.cache_hits += 1


def compile_counts() -> Counts:
    """A snapshot of the process's compilation totals (listening starts at the first call)."""
    global _LISTENING
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _LISTENING = True
    return dataclasses.replace(_TOTALS)


@dataclasses.dataclass
class Record:
    """Wall seconds and compilation counts per part, in the order the parts first ran."""

    parts: dict[str, tuple[float, Counts]] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    at_start: Counts = dataclasses.field(default_factory=compile_counts)

    def add(self, name: str, seconds: float, counts: Counts) -> None:
        before_seconds, before_counts = self.parts.get(name, (0.0, Counts()))
        self.parts[name] = (before_seconds + seconds, before_counts + counts)

    def to_json(self, matmul_rate: bool = False) -> dict:
        """``{"parts": [{"part", "seconds", "compilations", "compile_seconds", "cache_hits",
        "cache_saved_seconds"}], "total": {...}, "load_average": [1, 5, 15 min], "compilation_cache": dir}``
        (seconds rounded to 0.01); with ``matmul_rate``, also ``"float32_matmul_gflops"``, the machine's rate
        now (a 2048² float32 matmul, ~0.5 s, measured now or less than a minute ago:
        :func:`sentcomp.training.throughput.recent_measured_peak`), which wall times on machines of other speeds,
        or under other load, are compared by."""
        def entry(seconds, counts):
            return {"seconds": round(seconds, 2), "compilations": counts.compilations,
                    "compile_seconds": round(counts.compile_seconds, 2), "cache_hits": counts.cache_hits,
                    "cache_saved_seconds": round(counts.cache_saved_seconds, 2)}

        result = {"parts": [{"part": name, **entry(*value)} for name, value in self.parts.items()],
                  "total": entry(time.perf_counter() - self.started, compile_counts() - self.at_start),
                  "load_average": [round(x, 2) for x in os.getloadavg()],
                  "compilation_cache": compilation_cache_dir()}
        if matmul_rate:
            from sentcomp.training.throughput import recent_measured_peak

            result["float32_matmul_gflops"] = round(recent_measured_peak(jax.devices()[0]) / 1e9, 1)
        return result


_ACTIVE: list[Record] = []


@contextlib.contextmanager
def recording() -> Iterator[Record]:
    """Collects the :func:`part` timings made inside it (nested recordings each get their own)."""
    record = Record()
    _ACTIVE.append(record)
    try:
        yield record
    finally:
        _ACTIVE.remove(record)


@contextlib.contextmanager
def part(name: str) -> Iterator[None]:
    """Times the block as part ``name`` of the innermost :func:`recording` (nothing outside one)."""
    if not _ACTIVE:
        yield
        return
    record, start, counts = _ACTIVE[-1], time.perf_counter(), compile_counts()
    try:
        yield
    finally:
        record.add(name, time.perf_counter() - start, compile_counts() - counts)


# XLA:CPU's LLVM IR fusion emitters instead of its MLIR ones: the same HLO (so the same operations in the same
# order), compiled faster, running as fast. Measured on the main job (docs/table1.md, "Main-job size and cost"):
# compiling 26.3 → 20.7 s, the whole run 187 → 179 s, the same table. Other backends do not read it.
FAST_CPU_COMPILATION = ("xla_cpu_use_fusion_emitters", "false")
# One XLA:CPU device per core, at most this many: a batch split over them runs side by side on the cores, where a
# single device leaves one core idle in the operations XLA:CPU runs on one thread (the main job on 2 cores: 260 s
# → 221 s measured one after the other, the same table; docs/table1.md). Other backends do not read it.
MAX_CPU_DEVICES = 8


def cpu_device_count() -> int:
    """The cores this process may run on (its CPU affinity), at most :data:`MAX_CPU_DEVICES`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_CPU_DEVICES))


def with_xla_flag(xla_flags: str, name: str, value: str) -> str:
    """``xla_flags`` (an ``XLA_FLAGS`` value) with ``--name=value`` appended, unless it already sets ``name``
    (the caller's choice wins)."""
    if any(flag.lstrip("-").split("=")[0] == name for flag in xla_flags.split()):
        return xla_flags
    return f"{xla_flags} --{name}={value}".strip()


def set_cpu_defaults() -> None:
    """``XLA_FLAGS`` gets :data:`FAST_CPU_COMPILATION` and one CPU device per core (:func:`cpu_device_count`),
    each unless set there. XLA reads them when JAX starts its backends, so call this first; once they run (e.g.
    in a test session), it changes nothing."""
    flags = with_xla_flag(os.environ.get("XLA_FLAGS", ""), *FAST_CPU_COMPILATION)
    os.environ["XLA_FLAGS"] = with_xla_flag(flags, "xla_force_host_platform_device_count", str(cpu_device_count()))


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sentcomp/xla`` (default ``~/.cache/sentcomp/xla``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sentcomp" / "xla"


def compilation_cache_dir() -> str | None:
    """Where JAX's persistent compilation cache is (None: off)."""
    return jax.config.values["jax_compilation_cache_dir"] or None


def enable_compilation_cache() -> str | None:
    """Turns JAX's persistent compilation cache on in :func:`default_cache_dir`, ``$SENTCOMP_XLA_CACHE`` if set,
    or leaves it off when that is ``off``; every program is cached (no minimum compile time). A directory JAX
    was already given (``JAX_COMPILATION_CACHE_DIR``, as the test suite sets) is kept. Returns the directory
    (None: off). Call before the first compilation."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in CACHE_OFF:
        return None
    if compilation_cache_dir():
        return compilation_cache_dir()
    directory = Path(setting).expanduser() if setting else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(directory)
