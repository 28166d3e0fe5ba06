"""The device check (experiments/device_check.py): its smoke run on 8 simulated CPU devices has every row and
passes them all; a check really outside its tolerance is reported as FAIL and fails the run."""

import json
import math

import numpy as np
import pytest

from sentcomp.errors import SentcompError
from sentcomp.launcher import runner
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config
from sentcomp.launcher.local_cluster import run_local_processes
from sentcomp.programs import device_check

ROWS = [
    "kernel log Z", "kernel Φp_f", "kernel Quad (Gram)", "kernel ridge",
    "identity Φp = ∇log Z", "identity Φp float64", "identity xent excess = KL", "identity Quad excess",
    "forward bfloat16",
    "probe accuracy", "probe coefficients",
    "checkpoint restore", "resume",
    "features 1 device per host vs all",
    "multihost loss", "multihost ‖∂ℓ/∂Φ‖", "multihost ‖Φp_f‖", "multihost checkpoint",
    "multihost extraction ‖Φp_f‖", "main_decides",
    "forward tokens/s", "forward MFU", "train step tokens/s", "train step MFU",
]
INFORMATIONAL = {"forward tokens/s", "forward MFU", "train step tokens/s", "train step MFU", "multihost loss",
                 "multihost ‖∂ℓ/∂Φ‖", "multihost ‖Φp_f‖", "multihost extraction ‖Φp_f‖"}


def test_smoke_run_has_every_row_and_all_pass(smoke_workdir):
    assert tuple(load_config(f"{EXPERIMENTS_DIR}/device_check.py").checks) == device_check.CHECKS  # all groups
    workdir = smoke_workdir("device_check")
    results = json.loads((workdir / "results.json").read_text())
    assert [row["name"] for row in results["checks"]] == ROWS
    assert results["passed"] and results["failed"] == []
    assert (results["backend"], results["device_count"], results["process_count"]) == ("cpu", 8, 1)
    for row in results["checks"]:
        assert row["passed"] and math.isfinite(row["value"]), row
        if row["name"] in INFORMATIONAL:
            assert row["tolerance"] is None and row["value"] > 0, row
        else:
            assert row["value"] <= row["tolerance"], row
    assert "on 1 vs 8 devices" in results["checks"][ROWS.index("features 1 device per host vs all")]["compared"]
    assert results["checks"][ROWS.index("forward bfloat16")]["value"] > 0  # bf16 really rounded
    table = (workdir / "results.md").read_text()
    assert table.startswith("Device: backend cpu, device_kind cpu, device_count 8, local_device_count 8, "
                            "process_count 1")
    assert table.count("| PASS |") == len(ROWS) and "FAIL" not in table
    assert runner.read_done(workdir) == {**{k: results[k] for k in ("backend", "device_kind", "device_count",
                                                                    "local_device_count", "process_count",
                                                                    "jax_version")},
                                         "passed": True, "checks": len(ROWS),
                                         **{row["name"]: row["value"] for row in results["checks"]}}
    with np.load(workdir / "multihost_arrays.npz") as arrays:  # the multi-host group's arrays (1 process here)
        assert arrays["grad_phi"].any() and arrays["features"].shape == (16, 16)
        assert arrays["extracted_f"].shape == (16, 32) and arrays["extracted_word_log_probs"].shape == (16, 3)


def test_identities_hold_through_the_cli(tmp_path):
    """The paper's softmax/Quad identities (the ``identities`` group, formerly the kernel_check program)."""
    config = load_config(f"{EXPERIMENTS_DIR}/device_check.py:smoke,only=identities")
    done = runner.run_program(config, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["name"] for row in results["checks"]] == ROWS[4:8]
    assert json.loads((tmp_path / "config.json").read_text())["program"] == "sentcomp.programs.device_check"
    assert done["identity Φp = ∇log Z"] < 1e-5
    assert done["identity xent excess = KL"] < 1e-4
    assert done["identity Quad excess"] < 1e-3


def test_merged_programs_name_their_group(tmp_path):
    """The configs merged into device_check.py say which group runs their checks now."""
    for name, group in (("kernel_check", "identities"), ("multihost_check", "multihost")):
        with pytest.raises(SentcompError, match=f"--config=experiments/device_check.py:only={group}"):
            load_config(f"{EXPERIMENTS_DIR}/{name}.py:smoke")
    with pytest.raises(SentcompError, match="no group 'identity'"):
        load_config(f"{EXPERIMENTS_DIR}/device_check.py:only=kernels+identity")


def test_a_check_outside_its_tolerance_is_a_fail_and_fails_the_run(tmp_path):
    """bfloat16's forward pass really differs from float32's, so a zero tolerance must fail (no mocking)."""
    config = load_config(f"{EXPERIMENTS_DIR}/device_check.py:smoke")
    config.checks = ("kernels", "forward")
    config.tolerance.forward.bfloat16 = 0.0
    with pytest.raises(SentcompError, match=r"Device check failed: forward bfloat16 \(outside"):
        runner.run_program(config, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["passed"] and results["failed"] == ["forward bfloat16"]
    assert [row["passed"] for row in results["checks"]] == [True] * 4 + [False]
    assert results["checks"][-1]["value"] > 0
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| forward"))
    assert row.endswith("| FAIL |"), row
    assert runner.read_done(tmp_path) is None  # an incomplete run: no done.json


@pytest.mark.multiprocess
def test_two_processes_run_the_multi_host_rows_together(tmp_path):
    """2 processes × 4 CPU devices (``--coordinator_address``, as ``--distributed`` on a slice): features on one
    device per process vs all 8; process 0 writes the files, both print the table. (Two processes pretraining and
    checkpointing together: tests/test_multihost.py.)"""
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    codes = run_local_processes([f"--config={EXPERIMENTS_DIR}/device_check.py:smoke", f"--workdir={workdir}",
                                 "--config.checks=('features',)"], logs, processes=2, devices=4, timeout=300)
    assert codes == [0, 0], [(logs / f"process{i}.log").read_text()[-3000:] for i in range(2)]
    results = json.loads((workdir / "results.json").read_text())
    assert (results["process_count"], results["device_count"], results["passed"]) == (2, 8, True)
    assert [row["name"] for row in results["checks"]] == ROWS[13:14]
    assert "on 2 vs 8 devices" in results["checks"][-1]["compared"]
    table = (workdir / "results.md").read_text()
    for i in range(2):
        assert table in (logs / f"process{i}.log").read_text()


@pytest.mark.parametrize("key,value,message", [
    ("checks", ("kernels", "gpu"), "config.checks must be a non-empty subset"),
    ("compute_dtype", "float16", "config.compute_dtype must be one of"),
])
def test_bad_config_is_a_clear_error_before_any_work(tmp_path, key, value, message):
    config = load_config(f"{EXPERIMENTS_DIR}/device_check.py:smoke")
    config[key] = value
    with pytest.raises(SentcompError, match=message):
        device_check.run(config, tmp_path)
    assert not any(tmp_path.iterdir())
