"""Cloud TPU / GPU launcher: the generated gcloud commands (dry run, no cloud reachable here), the shell
wrappers in tpu_configs/, and the per-host sentcomp.main command validated by the real CLI."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sentcomp.launcher import launch

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--name=exp-tpu", "--bucket=my-bucket", "--repo=https://example.org/sentcomp.git", "--run=table1-a"]
CONFIG = "--config=experiments/device_check.py:smoke,only=identities"


def generated(action, target, *extra):
    return launch.commands([action, f"--target={target}", *COMMON, CONFIG, *extra])


@pytest.mark.parametrize("target", [name for name, target in launch.TARGETS.items() if target.kind == "tpu"])
def test_tpu_commands(target):
    spec = launch.TARGETS[target]
    (create,) = generated("create", target, "--zone=us-east5-a", "--project=proj", "--spot")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "exp-tpu"]
    assert {"--zone=us-east5-a", "--project=proj", f"--accelerator-type={spec.machine}", f"--version={spec.image}",
            "--spot"} <= set(create)
    for action in ("setup", "launch", "logs"):
        (ssh,) = generated(action, target)
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "exp-tpu"] and "--worker=all" in ssh
        assert f"--zone={spec.zone}" in ssh
    (setup,) = generated("setup", target)
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket" in setup[-1] and "jax[tpu]==" in setup[-1]
    (run,) = generated("launch", target, "--", "--sweep", "--config.identities.dim=8")
    assert '.venv/bin/python -m sentcomp.main "--workdir=$HOME/gcs/runs/table1-a" ' in run[-1]
    assert f"{CONFIG} --distributed --sweep --config.identities.dim=8 >" in run[-1]
    assert generated("teardown", target) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "exp-tpu", f"--zone={spec.zone}", "--quiet"]
    ]


def test_gpu_commands():
    (create,) = generated("create", "gpu-4xl4")
    assert create[:6] == ["gcloud", "compute", "instances", "create", "exp-tpu", "--zone=us-central1-a"]
    assert "--machine-type=g2-standard-48" in create and "--image-project=deeplearning-platform-release" in create
    (run,) = generated("launch", "gpu-4xl4")
    assert run[:4] == ["gcloud", "compute", "ssh", "exp-tpu"] and "--worker=all" not in run
    assert "--distributed" not in run[-1]  # one process sees every GPU of the VM
    (setup,) = generated("setup", "gpu-8xa100")
    assert "jax[cuda12]==" in setup[-1]


def test_bad_launcher_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        launch.commands(["launch", "--target=v4-8", "--name=x", CONFIG])
    assert "launch needs --run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.commands(["launch", "--target=v4-8", "--name=x", CONFIG, "--run=a b"])
    with pytest.raises(SystemExit):
        launch.commands(["create", "--target=v9-8", "--name=x"])


@pytest.mark.parametrize("action", sorted(launch.ACTIONS))
def test_shell_wrappers_print_the_generated_commands(action):
    args = ["--target=v4-32", *COMMON, CONFIG, "--dry-run", "--", "--sweep"]
    result = subprocess.run(
        ["bash", str(ROOT / "tpu_configs" / f"{action}.sh"), *args],
        capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [shlex.join(command) for command in launch.commands([action, *args])]


def test_per_host_command_is_valid_for_the_cli(tmp_path):
    """The flags every TPU host gets are accepted by sentcomp.main (checked with --dry_run, which does not
    join a cluster) and name the sweep the config defines."""
    args = launch.parser().parse_args(["launch", "--target=v4-32", "--name=x", "--run=r", CONFIG])
    args.main_flags = ["--sweep", "--config.identities.n_contexts=4"]
    flags = launch.main_flags(launch.TARGETS["v4-32"], args)
    result = subprocess.run(
        [sys.executable, "-m", "sentcomp.main", f"--workdir={tmp_path}", *flags, "--dry_run"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [f"{tmp_path}/seed=0", f"{tmp_path}/seed=1"]
