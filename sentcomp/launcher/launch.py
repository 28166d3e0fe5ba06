"""Cloud machines for sentcomp: the ``gcloud`` commands to create, set up, launch on and tear down Cloud TPU VMs
(one host or a multi-host pod slice) and single-node multi-GPU VMs. Standard library only, so it runs on a
laptop with just the repository and the gcloud CLI.

    python -m sentcomp.launcher.launch create   --target=v4-32 --name=NAME [--zone=Z] [--project=P] [--spot]
    python -m sentcomp.launcher.launch setup    --target=v4-32 --name=NAME --bucket=BUCKET [--repo=URL] [--ref=main]
    python -m sentcomp.launcher.launch launch   --target=v4-32 --name=NAME --bucket=BUCKET --run=RUN \\
                                       --config=experiments/X.py[:args] [-- --sweep --config.key=value ...]
    python -m sentcomp.launcher.launch logs     --target=v4-32 --name=NAME --run=RUN
    python -m sentcomp.launcher.launch teardown --target=v4-32 --name=NAME

``--dry-run`` prints the commands instead of running them. ``tpu_configs/*.sh`` wrap these actions and
tpu_configs/README.md walks through a run.

Where things live on every host: the repository in ``~/sentcomp`` (virtualenv ``.venv``), the bucket
mounted with gcsfuse at ``~/gcs``, and a run's workdir at ``~/gcs/runs/RUN`` = ``gs://BUCKET/runs/RUN``: one
filesystem that all hosts share, as multi-host checkpoints and resume need. On TPU every host runs the same
command (``--worker=all``) with ``--distributed``: JAX finds the slice's hosts by itself and the mesh spans
every chip. A GPU VM is one process that sees all its GPUs.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = "$HOME/sentcomp"
MOUNT_DIR = "$HOME/gcs"
RUN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class Target:
    """A machine shape: a Cloud TPU accelerator type, or a Compute Engine VM with GPUs."""

    kind: str  # "tpu" or "gpu"
    machine: str  # TPU accelerator type, or Compute Engine machine type
    zone: str  # a zone that offers it (override with --zone)
    image: str  # TPU runtime version, or the GPU VM's Deep Learning VM image family
    jax_extra: str  # the pip extra of jax for this accelerator
    description: str


TARGETS = {
    "v4-8": Target("tpu", "v4-8", "us-central2-b", "tpu-ubuntu2204-base", "tpu", "1 host, 4 TPU v4 chips"),
    "v4-32": Target(
        "tpu", "v4-32", "us-central2-b", "tpu-ubuntu2204-base", "tpu", "pod slice: 4 hosts x 4 TPU v4 chips"
    ),
    "v5e-8": Target("tpu", "v5litepod-8", "europe-west4-b", "v2-alpha-tpuv5-lite", "tpu", "1 host, 8 TPU v5e chips"),
    "v5e-32": Target(
        "tpu", "v5litepod-32", "europe-west4-b", "v2-alpha-tpuv5-lite", "tpu", "pod slice: 32 TPU v5e chips"
    ),
    "gpu-4xl4": Target(
        "gpu", "g2-standard-48", "us-central1-a", "common-cu128-ubuntu-2204-nvidia-570", "cuda12", "1 VM, 4 NVIDIA L4"
    ),
    "gpu-8xa100": Target(
        "gpu", "a2-highgpu-8g", "us-central1-a", "common-cu128-ubuntu-2204-nvidia-570", "cuda12", "1 VM, 8 NVIDIA A100"
    ),
}


def _location(target: Target, args) -> list[str]:
    return [f"--zone={args.zone or target.zone}"] + ([f"--project={args.project}"] if args.project else [])


def remote(target: Target, args, script: str) -> list[str]:
    """``gcloud ... ssh`` running ``script`` with bash on every host of the machine."""
    if target.kind == "tpu":
        ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(target, args), "--worker=all"]
    else:
        ssh = ["gcloud", "compute", "ssh", args.name, *_location(target, args)]
    return [*ssh, f"--command=bash -c {shlex.quote(script)}"]


def create(target: Target, args) -> list[list[str]]:
    if target.kind == "tpu":
        command = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_location(target, args),
                   f"--accelerator-type={target.machine}", f"--version={target.image}"]  # fmt: skip
        return [command + (["--spot"] if args.spot else [])]
    command = ["gcloud", "compute", "instances", "create", args.name, *_location(target, args),
               f"--machine-type={target.machine}", "--maintenance-policy=TERMINATE",
               f"--image-family={target.image}", "--image-project=deeplearning-platform-release",
               "--boot-disk-size=200GB", "--metadata=install-nvidia-driver=True",
               "--scopes=cloud-platform"]  # fmt: skip
    return [command + (["--provisioning-model=SPOT"] if args.spot else [])]


def setup_script(target: Target, args) -> str:
    """Installs Python 3.11, gcsfuse (bucket at ~/gcs), the repository at ``--ref`` and JAX for the accelerator."""
    return " && ".join([
        "set -ex",
        "sudo apt-get update -q",
        "sudo apt-get install -y -q python3.11 python3.11-venv git curl lsb-release",
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
        "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null",
        'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt '
        'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list',
        "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse",
        f'mkdir -p "{MOUNT_DIR}"',
        f'(mountpoint -q "{MOUNT_DIR}" || gcsfuse --implicit-dirs --rename-dir-limit=200000 '
        f'{shlex.quote(args.bucket)} "{MOUNT_DIR}")',
        f'(test -d "{REPO_DIR}" || git clone -q {shlex.quote(args.repo)} "{REPO_DIR}")',
        f'git -C "{REPO_DIR}" fetch -q origin {shlex.quote(args.ref)} && git -C "{REPO_DIR}" checkout -q FETCH_HEAD',
        f'cd "{REPO_DIR}" && python3.11 -m venv .venv && .venv/bin/pip install -q -e .',
        # the accelerator build of the very jax version setup.py pinned
        f'.venv/bin/pip install -q "jax[{target.jax_extra}]=='
        '$(.venv/bin/python -c "import jax; print(jax.__version__)")"',
        '.venv/bin/python -c "import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)"',
    ])  # fmt: skip


def workdir(args) -> str:
    """The run's workdir on every host (the gcsfuse mount of ``gs://BUCKET/runs/RUN``)."""
    return f"{MOUNT_DIR}/runs/{args.run}"


def main_flags(target: Target, args) -> list[str]:
    """The per-host flags of ``python -m sentcomp.main`` apart from ``--workdir``."""
    distributed = ["--distributed"] if target.kind == "tpu" else []
    return [f"--config={args.config}", *distributed, *args.main_flags]


def log_file(args) -> str:
    return f"{workdir(args)}/logs/$(hostname).log"


def launch_script(target: Target, args) -> str:
    """Starts the run detached on each host (it survives the ssh session), logging into the workdir."""
    flags = " ".join(shlex.quote(flag) for flag in main_flags(target, args))
    return (
        f'cd "{REPO_DIR}" && mkdir -p "{workdir(args)}/logs" && setsid nohup .venv/bin/python -m sentcomp.main '
        f'"--workdir={workdir(args)}" {flags} > "{log_file(args)}" 2>&1 < /dev/null & echo started on $(hostname)'
    )


def logs_script(target: Target, args) -> str:
    return f'tail -n {args.lines} "{log_file(args)}"'


def teardown(target: Target, args) -> list[list[str]]:
    if target.kind == "tpu":
        return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(target, args), "--quiet"]]
    return [["gcloud", "compute", "instances", "delete", args.name, *_location(target, args), "--quiet"]]


ACTIONS = {
    "create": create,
    "setup": lambda target, args: [remote(target, args, setup_script(target, args))],
    "launch": lambda target, args: [remote(target, args, launch_script(target, args))],
    "logs": lambda target, args: [remote(target, args, logs_script(target, args))],
    "teardown": teardown,
}


def _local_origin() -> str | None:
    """The ``origin`` URL of the clone this file is in, if any."""
    try:
        result = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "remote", "get-url", "origin"],
            capture_output=True,
            text=True,
        )
    except OSError:  # no git on this machine
        return None
    return result.stdout.strip() or None


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m sentcomp.launcher.launch", description=__doc__.split("\n\n")[0])
    parse.add_argument("action", choices=ACTIONS)
    parse.add_argument("--target", required=True, choices=TARGETS, help="machine shape (see TARGETS)")
    parse.add_argument("--name", required=True, help="the TPU / VM name")
    parse.add_argument("--zone", help="default: the target's zone")
    parse.add_argument("--project", help="default: gcloud's configured project")
    parse.add_argument("--spot", action="store_true", help="create: a Spot (preemptible) machine")
    parse.add_argument("--bucket", help="setup: the GCS bucket (name only) that holds the runs")
    parse.add_argument("--repo", default=_local_origin(),
                       help="setup: git URL of sentcomp (default: this clone's origin)")
    parse.add_argument("--ref", default="main", help="setup: branch, tag or commit to check out")
    parse.add_argument("--run", help="launch/logs: the run's name; its workdir is gs://BUCKET/runs/RUN")
    parse.add_argument("--config", help="launch: experiments/X.py[:args], relative to the repository")
    parse.add_argument("--lines", type=int, default=50, help="logs: how many lines")
    parse.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parse


REQUIRED = {"setup": ("bucket", "repo"), "launch": ("run", "config"), "logs": ("run",)}



def commands(argv: list[str]) -> list[list[str]]:
    """The commands of ``python -m sentcomp.launcher.launch ARGV`` (flags after ``--`` go to sentcomp.main on
    launch)."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parse = parser()
    args = parse.parse_args(argv[:split])
    args.main_flags = argv[split + 1 :]
    missing = [f"--{name}" for name in REQUIRED.get(args.action, ()) if getattr(args, name) is None]
    if missing:
        parse.error(f"{args.action} needs {' and '.join(missing)}")
    if args.run is not None and not RUN_NAME.match(args.run):
        parse.error(f"--run={args.run!r}: use letters, digits, '.', '_' and '-' only")
    return ACTIONS[args.action](TARGETS[args.target], args)


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv[: argv.index("--") if "--" in argv else len(argv)]
    for command in commands(argv):
        print(shlex.join(command), flush=True)
        if not dry_run:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
