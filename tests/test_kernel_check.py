"""The kernel-identity program, run through the CLI entry point."""

import json

from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config
from sentcomp.main import run_program


def test_identities_hold_through_the_cli(tmp_path):
    config = load_config(f"{EXPERIMENTS_DIR}/kernel_check.py:smoke")
    deviations = run_program(config, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == deviations
    assert json.loads((tmp_path / "config.json").read_text())["program"] == "sentcomp.programs.kernel_check"
    assert deviations["conditional_mean_vs_grad_log_z"] < 1e-5
    assert deviations["xent_excess_vs_kl"] < 1e-4
    assert deviations["quad_excess_vs_half_sq_norm"] < 1e-3
