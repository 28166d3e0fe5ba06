"""JAX's multi-process runtime for real on one machine: 2 processes × 4 CPU devices (gloo collectives on
localhost) run a program through the CLI and get the numbers 1 process × 8 devices gets.

``run_processes`` launches any config this way, so other programs (e.g. pretraining) add a test in a few lines.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sentcomp.config_files import EXPERIMENTS_DIR, load_config, override
from sentcomp.main import run_program

TIMEOUT_SECONDS = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_processes(
    config_spec: str, workdir: Path, num_processes: int = 2, devices_per_process: int = 4, extra_flags=()
) -> None:
    """Runs ``python -m sentcomp.main`` as ``num_processes`` JAX processes joined on localhost; fails with their
    logs if one fails or they exceed the timeout (all children are killed either way)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    address = f"localhost:{free_port()}"
    logs = [workdir.parent / f"{workdir.name}.process{i}.log" for i in range(num_processes)]
    children = []
    try:
        for process_id, log in enumerate(logs):
            command = [
                sys.executable, "-m", "sentcomp.main", f"--config={config_spec}", f"--workdir={workdir}",
                f"--coordinator_address={address}", f"--num_processes={num_processes}", f"--process_id={process_id}",
                *extra_flags,
            ]  # fmt: skip
            with open(log, "wb") as out:
                children.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while any(child.poll() is None for child in children):
            if time.monotonic() > deadline or any(child.poll() not in (None, 0) for child in children):
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    codes = [child.returncode for child in children]
    if codes != [0] * num_processes:
        tails = "\n".join(f"--- process {i} (exit {code}):\n{log.read_text()[-3000:]}" for i, (code, log) in enumerate(zip(codes, logs)))
        raise AssertionError(f"multi-process run failed or timed out after {TIMEOUT_SECONDS}s:\n{tails}")


def test_two_processes_match_one_process(tmp_path):
    spec = f"{EXPERIMENTS_DIR}/multihost_check.py:smoke"
    two = tmp_path / "two_processes"
    run_processes(spec, two)
    two_results = json.loads((two / "results.json").read_text())
    assert (two_results["process_count"], two_results["device_count"]) == (2, 8)
    assert two_results["checkpoint_max_abs_diff"] == 0.0
    with np.load(two / "arrays.npz") as arrays:
        two_arrays = dict(arrays)

    # One process × 8 devices (this pytest process), resuming from a copy of the 2-process workdir: it
    # recomputes everything and restores the Orbax checkpoint the two processes wrote together.
    one = tmp_path / "one_process"
    shutil.copytree(two, one)
    one_results = run_program(load_config(spec), one)
    assert (one_results["process_count"], one_results["device_count"]) == (1, 8)
    with np.load(one / "arrays.npz") as arrays:
        for name, value in arrays.items():
            np.testing.assert_allclose(two_arrays[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert one_results["checkpoint_max_abs_diff"] < 1e-6  # restored 2-process values vs 1-process values
    assert two_arrays["grad_phi"].any() and two_arrays["features"].shape == (16, 16)


def test_two_processes_run_a_sweep_together(tmp_path):
    spec = f"{EXPERIMENTS_DIR}/multihost_check.py:smoke"
    run_processes(spec, tmp_path, extra_flags=["--sweep"])
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(row["name"], row["status"], row["metrics"]["process_count"]) for row in rows] == [
        ("seed=0", "done", 2),
        ("seed=1", "done", 2),
    ]
    for row in rows:  # each point's numbers equal one process's
        alone = run_program(override(load_config(spec), row["params"]), tmp_path / "alone" / row["name"])
        assert abs(alone["loss"] - row["metrics"]["loss"]) < 1e-5 * alone["loss"]
    run_processes(spec, tmp_path, extra_flags=["--sweep"])  # complete points: every process skips them
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["reused", "reused"]
