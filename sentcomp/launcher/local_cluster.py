"""A multi-host run on one machine: N processes of ``python -m sentcomp.main`` joined on localhost.

    python -m sentcomp.launcher.local_cluster --processes=2 --devices=4 -- --config=experiments/X.py --workdir=DIR

Each process sees ``--devices`` simulated CPU devices and joins JAX's multi-process runtime (gloo CPU
collectives) through ``--coordinator_address=localhost:PORT --num_processes --process_id``, exactly as the
hosts of a TPU slice do; a program's numbers must not change from one process with all devices. Output of
process ``i`` goes to ``LOG_DIR/process<i>.log``. If a process fails or the timeout passes, all are killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on localhost right now."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def with_device_count(xla_flags: str, devices: int) -> str:
    """``xla_flags`` (the ``XLA_FLAGS`` value) asking for ``devices`` simulated CPU devices: any earlier device
    count replaced, every other flag kept."""
    kept = [flag for flag in xla_flags.split() if not flag.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def run_local_processes(
    main_args: list[str], log_dir: str | Path, processes: int = 2, devices: int = 4, timeout: float = 600
) -> list[int]:
    """Runs ``python -m sentcomp.main MAIN_ARGS`` as ``processes`` joined JAX processes; returns their exit codes
    (negative for a process killed at the timeout). Stops everything as soon as one process fails."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), devices))
    cluster = [f"--coordinator_address=localhost:{free_port()}", f"--num_processes={processes}"]
    children = []
    try:
        for process_id in range(processes):
            command = [sys.executable, "-m", "sentcomp.main", *main_args, *cluster, f"--process_id={process_id}"]
            with open(log_dir / f"process{process_id}.log", "wb") as log:
                children.append(
                    subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                )
        deadline = time.monotonic() + timeout
        while any(child.poll() is None for child in children) and time.monotonic() < deadline:
            if any(child.poll() not in (None, 0) for child in children):
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    return [child.returncode for child in children]


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m sentcomp.launcher.local_cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="simulated CPU devices per process")
    parser.add_argument("--log_dir", default="local_cluster_logs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds")
    args = parser.parse_args(argv[:split])
    codes = run_local_processes(argv[split + 1 :], args.log_dir, args.processes, args.devices, args.timeout)
    print(f"exit codes {codes}; logs in {args.log_dir}/process<i>.log")
    return 0 if codes == [0] * args.processes else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
