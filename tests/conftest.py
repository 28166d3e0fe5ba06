"""Test-wide settings (set before JAX or HF libraries load): 8 simulated CPU devices, no hub access, and one
persistent XLA compilation cache per test run, shared by the xdist workers and the processes tests launch, so
a program several tests build (the tiny GPT-2's train step, the probe kernels) compiles once per run."""

import os
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# named by the first process of the run to load this file (pytest, or xdist's controller); inherited by the rest
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"sentcomp-xla-{os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # most programs here compile in < 1 s
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402 (after the settings above)


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """``smoke_workdir(name)``: the workdir of ``experiments/<name>.py:smoke`` run through ``runner.run_program``
    once per test process, checked to have recorded its config and finished. A program's own test module
    reading this run takes its smoke test over from ``test_experiments`` (which would run it again)."""
    from sentcomp.launcher import runner
    from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config

    workdirs = {}

    def workdir(name):
        if name not in workdirs:
            path = tmp_path_factory.mktemp(f"{name}_smoke")
            runner.run_program(load_config(f"{EXPERIMENTS_DIR / name}.py:smoke"), path)
            assert runner.read_done(path) is not None and (path / runner.CONFIG_FILE).exists()
            workdirs[name] = path
        return workdirs[name]

    return workdir


@pytest.fixture
def registry():
    """The task registry (``sentcomp.data.tasks.TASKS``), restored after the test."""
    from sentcomp.data.tasks import TASKS

    saved = dict(TASKS)
    yield TASKS
    TASKS.clear()
    TASKS.update(saved)


def pytest_configure(config):
    """The test tiers' markers (the fast tier deselects both: ``-m "not slow and not multiprocess"``)."""
    config.addinivalue_line("markers", "slow: takes more than ~15 s")
    config.addinivalue_line("markers", "multiprocess: starts several JAX processes")
