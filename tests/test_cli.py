"""The command line, run in this process (``sentcomp.main.run_cli``) but for one real ``python -m sentcomp.main``
process that also checks absl's logging set-up: overrides, validation before any work (unknown key, wrong type,
missing required field, a workdir holding a different run), one-line errors with exit code 2, resume, sweeps;
config-file helpers."""

import json
import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from cli_testing import error_line

from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files, runner
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, parse_config_arg
from sentcomp.main import run_program

IDENTITIES = f"{EXPERIMENTS_DIR}/device_check.py:smoke,only=identities"  # the cheapest program


def cli_process(*args):
    """``python -m sentcomp.main ARGS`` in a new interpreter: for what only a real process shows (absl's logging
    set-up from ``--verbosity``)."""
    return subprocess.run([sys.executable, "-m", "sentcomp.main", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_override_runs_and_records_config(cli, tmp_path):
    result = cli_process(f"--config={IDENTITIES}", f"--workdir={tmp_path}", "--config.identities.dim=16")
    assert result.returncode == 0, result.stderr[-2000:]
    info_lines = re.compile(r"^I\d{4} ", re.M)  # absl's INFO prefix: hidden unless --verbosity=0 asks for it
    assert not info_lines.search(result.stderr), result.stderr[-2000:]
    verbose = cli_process(f"--config={IDENTITIES}", f"--workdir={tmp_path / 'verbose'}", "--verbosity=0")
    assert verbose.returncode == 0 and info_lines.search(verbose.stderr), verbose.stderr[-2000:]
    assert json.loads((tmp_path / "config.json").read_text())["identities"]["dim"] == 16
    done = json.loads((tmp_path / "done.json").read_text())
    results = json.loads((tmp_path / "results.json").read_text())
    assert done == {**{key: results[key] for key in ("backend", "device_kind", "device_count", "local_device_count",
                                                     "process_count", "jax_version", "passed")},
                    "checks": len(results["checks"]), **{row["name"]: row["value"] for row in results["checks"]}}
    # the headline = the program's return

    changed = error_line(cli(f"--config={IDENTITIES}", f"--workdir={tmp_path}", "--config.identities.dim=8"))
    assert "already holds a run with a different config (identities.dim: 16 -> 8)" in changed


def test_user_mistakes_fail_before_work_with_one_line(cli, tmp_path):
    workdir = tmp_path / "run"
    unknown = error_line(cli(f"--config={IDENTITIES}", f"--workdir={workdir}", "--config.identities.vocab_sise=3"))
    assert "'identities.vocab_sise'" in unknown and "Valid keys: dim, n_contexts, vocab_size" in unknown
    wrong_type = error_line(cli(f"--config={IDENTITIES}", f"--workdir={workdir}", "--config.identities.dim=abc"))
    assert "--config.identities.dim=abc" in wrong_type and "config.identities.dim has type int" in wrong_type
    missing_file = error_line(cli(f"--config={tmp_path}/nope.py", f"--workdir={workdir}"))
    assert "nope.py does not exist" in missing_file
    bad_arg = error_line(cli(f"--config={EXPERIMENTS_DIR}/device_check.py:smok", f"--workdir={workdir}"))
    assert "Unknown config argument 'smok'; this config accepts: smoke, only" in bad_arg
    assert not workdir.exists()


REQUIRED = textwrap.dedent(
    '''
    """A config with a required field.

        python -m sentcomp.main --config=required.py --workdir=DIR --config.note=...
    """
    import ml_collections
    from ml_collections import config_dict


    def get_config(arg=None):
        config = ml_collections.ConfigDict()
        config.program = "sentcomp.programs.device_check"
        config.checks, config.seed = ("identities",), 0
        config.identities = ml_collections.ConfigDict(dict(vocab_size=50, dim=4, n_contexts=2))
        config.tolerance = ml_collections.ConfigDict(dict(identities=dict(
            conditional_mean_vs_grad_log_z=1e-5, conditional_mean_vs_float64=1e-5, xent_excess_vs_kl=1e-4,
            quad_excess_vs_half_sq_norm=1e-3)))
        config.data = ml_collections.ConfigDict({"path": config_dict.placeholder(str)})
        return config
    '''
)


def test_missing_required_field_is_named(cli, tmp_path):
    (tmp_path / "required.py").write_text(REQUIRED)
    workdir = tmp_path / "run"
    missing = error_line(cli(f"--config={tmp_path}/required.py", f"--workdir={workdir}"))
    assert "Required config field(s) not set: data.path" in missing and "--config.data.path=..." in missing
    assert not workdir.exists()
    result = cli(f"--config={tmp_path}/required.py", f"--workdir={workdir}", "--config.data.path=/x", "--dry_run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "path: /x" in result.stdout and not workdir.exists()


@pytest.mark.slow
def test_sweep_through_the_cli(cli, tmp_path):
    listed = cli(f"--config={IDENTITIES}", f"--workdir={tmp_path}", "--sweep", "--dry_run")
    assert listed.returncode == 0, listed.stderr[-2000:]
    names = ["seed=0", "seed=1"]
    assert listed.stdout.split() == [f"{tmp_path}/{name}" for name in names]
    result = cli(f"--config={IDENTITIES}", f"--workdir={tmp_path}", "--sweep", "--config.identities.n_contexts=4")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["name"] for row in rows] == names and {row["status"] for row in rows} == {"done"}
    assert all(row["metrics"]["identity xent excess = KL"] < 1e-4 for row in rows)
    assert json.loads((tmp_path / names[0] / "config.json").read_text())["identities"]["n_contexts"] == 4
    (tmp_path / "no_sweep.py").write_text(REQUIRED.replace("config_dict.placeholder(str)", "'x'"))
    no_sweep = error_line(cli(f"--config={tmp_path}/no_sweep.py", f"--workdir={tmp_path}/x", "--sweep"))
    assert "defines no get_sweep()" in no_sweep


def test_resume_same_config_and_allowed_changes(tmp_path):
    config = load_config(IDENTITIES)
    first = run_program(config, tmp_path)
    assert run_program(config, tmp_path) == first  # same config: the program runs again (resumes)
    changed = config_files.override(config, {"seed": 1})
    with pytest.raises(SentcompError, match="seed: 0 -> 1"):
        run_program(changed, tmp_path)
    config.resume_may_change = ("seed",)
    run_program(config_files.override(config, {"seed": 1}), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1


def test_program_must_exist(tmp_path):
    config = ml_collections.ConfigDict({"program": "sentcomp.no_such_program"})
    with pytest.raises(SentcompError, match="not an importable module"):
        runner.validate(config, tmp_path)
    with pytest.raises(SentcompError, match="has no 'program' key"):
        runner.validate(ml_collections.ConfigDict({"x": 1}), tmp_path)


def test_parse_config_arg():
    args = parse_config_arg("task=agnews,smoke,n=3,rate=0.5", task="sst2", smoke=False, n=1, rate=1.0, flag=True)
    assert args.to_dict() == {"task": "agnews", "smoke": True, "n": 3, "rate": 0.5, "flag": True}
    assert parse_config_arg(None, smoke=False).smoke is False
    assert parse_config_arg("flag=false", flag=True).flag is False
    with pytest.raises(SentcompError, match="n='x': expected int"):
        parse_config_arg("n=x", n=1)
    with pytest.raises(SentcompError, match="Unknown config argument 'tsak'"):
        parse_config_arg("tsak=1", task="sst2")


def test_config_helpers():
    config = ml_collections.ConfigDict({"a": 1, "model": {"dim": 8, "name": "gpt2"}})
    assert config_files.override(config, {"model.dim": 16}).model.dim == 16 and config.model.dim == 8
    with pytest.raises(SentcompError, match="config.model has no field 'dimm'. Valid keys: dim, name"):
        config_files.override(config, {"model.dimm": 16})
    assert config_files.config_diff({"a": 1, "m": {"d": 8}}, {"a": 1, "m": {"d": 9}, "b": 2}) == [
        "b: '<absent>' -> 2",
        "m.d: 8 -> 9",
    ]


def test_config_file_must_be_python(tmp_path):
    config = tmp_path / "config.txt"
    config.write_text("get_config = None\n")
    with pytest.raises(SentcompError, match=r"config.txt is not a Python file: give a \.py file"):
        config_files.load_module(config)


def test_the_command_line_sets_xla_cpus_defaults_unless_told_otherwise(cli, tmp_path, monkeypatch):
    """XLA_FLAGS gets XLA:CPU's LLVM IR fusion emitters (timings.FAST_CPU_COMPILATION) and one CPU device per core
    (at most MAX_CPU_DEVICES) before JAX could start its backends; a choice already in XLA_FLAGS stays."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    devices, fast, mlir = ("--xla_force_host_platform_device_count=3", "--xla_cpu_use_fusion_emitters=false",
                           "--xla_cpu_use_fusion_emitters=true")
    for given, expected in [(devices, f"{devices} {fast}"), (mlir, f"{mlir} --xla_force_host_platform_device_count=8"),
                            ("", f"{fast} --xla_force_host_platform_device_count=8")]:
        monkeypatch.setenv("XLA_FLAGS", given)
        assert cli(f"--config={IDENTITIES}", f"--workdir={tmp_path}", "--dry_run").returncode == 0
        assert os.environ["XLA_FLAGS"] == expected
