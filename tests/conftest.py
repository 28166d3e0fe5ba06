"""Test-wide settings (set before JAX or HF libraries load): 8 simulated CPU devices, no hub access, a persistent
XLA compilation cache shared by the xdist workers, the processes tests launch and later runs of the suite, and the
two test tiers.

Tiers: ``slow`` (a test that takes more than ~15 s on 2 idle cores; every test that reads a smoke experiment's run
through ``smoke_workdir`` gets it automatically) and ``multiprocess`` (a test that starts several JAX processes).
``make test-fast`` deselects both; ``make test`` (the README's command, and CI's) runs every test."""

import ctypes
import fcntl
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keyed by JAX itself (program, compile options, JAX version, devices), so an entry is never reused for another
# program; kept between runs so the edit-test loop recompiles only what changed, bounded in size (LRU eviction).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sentcomp" / "xla-tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # most programs here compile in < 1 s
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# (JAX reads the settings above when imported, XLA_FLAGS only when its backends start)
from sentcomp.results import timings  # noqa: E402
from sentcomp.results.timings import with_xla_flag  # noqa: E402

# 8 simulated devices, and XLA:CPU's cheapest code generation: LLVM optimisation level 0 and the LLVM IR
# fusion emitters instead of the MLIR ones (the HLO, hence every program's operations and their order, is the
# same either way). On this suite's tiny shapes compiling dominates and running barely shows: a train step
# of a tiny GPT-2 compiles in 2.0 s by default, 1.5 s at level 0 and 0.7 s with both (docs/testing.md). Set
# either flag in XLA_FLAGS to test with another choice.
os.environ["XLA_FLAGS"] = with_xla_flag(with_xla_flag(
    with_xla_flag(os.environ.get("XLA_FLAGS", ""), "xla_force_host_platform_device_count", "8"),
    "xla_backend_optimization_level", "0"), *timings.FAST_CPU_COMPILATION)

import pytest  # noqa: E402 (after the settings above)

COMPILE_RECORDS = pytest.StashKey[tuple]()

TIER_MARKERS = {
    "slow": "takes more than ~15 s on 2 idle cores (deselected by make test-fast)",
    "multiprocess": "starts several JAX processes (deselected by make test-fast)",
}


def pytest_configure(config):
    for name, meaning in TIER_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


COMPILE_REPORT = "SENTCOMP_COMPILE_REPORT"  # a path prefix: each pytest process writes <prefix>.<worker>.jsonl


def pytest_sessionstart(session):
    """With ``SENTCOMP_COMPILE_REPORT=<prefix>`` set, every XLA compilation of this process (JAX's backend-compile
    event, which JAX 0.10 also emits for a program loaded from the persistent cache) is recorded as ``{"test",
    "program", "seconds"}``, one JSON line each in ``<prefix>.<xdist worker or main>.jsonl`` at the end
    (docs/testing.md)."""
    prefix = os.environ.get(COMPILE_REPORT)
    if not prefix:
        return
    import jax

    from sentcomp.results.timings import COMPILE_EVENT

    records: list[dict] = []
    session.config.stash[COMPILE_RECORDS] = (prefix, records)

    def on_duration(event: str, duration_secs: float, **fields) -> None:
        if event == COMPILE_EVENT:
            records.append({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                            "program": fields.get("fun_name", ""), "seconds": round(duration_secs, 4)})

    jax.monitoring.register_event_duration_secs_listener(on_duration)


def pytest_sessionfinish(session):
    if COMPILE_RECORDS in session.config.stash:
        prefix, records = session.config.stash[COMPILE_RECORDS]
        lines = "".join(json.dumps(record) + "\n" for record in records)
        Path(f"{prefix}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl").write_text(lines)


def pytest_collection_modifyitems(items):
    """A test reading a smoke experiment's run is slow: the run is the longest part of the suite."""
    for item in items:
        if "smoke_workdir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# A worker's resident memory above which a finished module's compiled programs are dropped (see below)
RELEASE_ABOVE_BYTES = 2 * 2**30


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc/self/statm), or None where it cannot be read."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(autouse=True, scope="module")
def release_memory_after_each_module():
    """An xdist worker runs hundreds of tests in one process, and JAX keeps every compiled program (and what it
    holds) in memory: without this a worker grew past 5 GB over the suite. After a test module, once the worker
    holds more than :data:`RELEASE_ABOVE_BYTES` (or its memory cannot be read), JAX's in-memory caches are dropped
    (a program compiled again later is read from the persistent compilation cache) and freed heap pages go back
    to the system (glibc's ``malloc_trim``); below it, later modules keep reusing the programs in memory."""
    yield
    resident = resident_bytes()
    if resident is not None and resident < RELEASE_ABOVE_BYTES:
        return
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """``smoke_workdir(name)``: the workdir of ``experiments/<name>.py:smoke`` run through ``runner.run_program``
    once per test session, shared by every xdist worker (the first to ask runs it under a file lock, the others
    wait and read it), checked to have recorded its config and finished. Tests treat it as read-only (copy it to
    change it). A program's own test module reading this run takes its smoke test over from ``test_experiments``
    (which would run it again)."""
    from sentcomp.launcher import runner
    from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config
    from sentcomp.results import layout

    shared_root = tmp_path_factory.getbasetemp().parent  # the session's root, the same for every xdist worker
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        shared_root = tmp_path_factory.getbasetemp()

    def workdir(name):
        path = shared_root / f"{name}_smoke"
        with open(shared_root / f"{name}_smoke.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if runner.read_done(path) is None:
                runner.run_program(load_config(f"{EXPERIMENTS_DIR / name}.py:smoke"), path)
        assert runner.read_done(path) is not None and (path / layout.CONFIG_FILE).exists()
        return path

    return workdir


@pytest.fixture
def cli(capsys):
    """``cli(*args)``: ``python -m sentcomp.main ARGS`` run in this process (:func:`sentcomp.main.run_cli`: no new
    interpreter, no JAX import), as a ``CompletedProcess`` with its exit code and captured output (read it with
    ``cli_testing.error_line`` / ``ok``)."""
    from sentcomp.main import run_cli

    def run(*args):
        capsys.readouterr()
        code = run_cli([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


@pytest.fixture
def registry():
    """The task registry (``sentcomp.data.tasks.TASKS``), restored after the test."""
    from sentcomp.data.tasks import TASKS

    saved = dict(TASKS)
    yield TASKS
    TASKS.clear()
    TASKS.update(saved)

