"""The reproducibility record: one runs.jsonl line per start of a run (versions, code, devices, command), a
warning naming what changed when a resume starts in another setting, and no failure without git."""

import datetime
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import warnings

import ml_collections
import pytest

from sentcomp.launcher import provenance, runner
from sentcomp.results import layout


@pytest.fixture
def config(tmp_path, monkeypatch):
    """The config of a program made importable here: ``run`` returns ``{"y": 2x}``."""
    (tmp_path / "provenance_test_program.py").write_text("def run(config, workdir):\n    return {'y': 2 * config.x}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return ml_collections.ConfigDict({"program": "provenance_test_program", "x": 3})


def records(workdir):
    return [json.loads(line) for line in (workdir / layout.RUNS_FILE).read_text().splitlines()]


def git(directory, *args):
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True).stdout


def test_one_record_per_start_and_a_warning_when_the_setting_changed(config, tmp_path):
    workdir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", provenance.ProvenanceWarning)
        assert runner.run_program(config, workdir) == {"y": 6}
        [first] = records(workdir)
        runner.run_program(config, workdir)  # a resume in the same setting: a second record, no warning
    assert len(records(workdir)) == 2 and (workdir / layout.CONFIG_FILE).exists()

    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "scikit-learn"):
        assert first["packages"][name] == importlib.metadata.version(name)
    assert first["sentcomp"] == importlib.metadata.version("sentcomp")
    assert first["python"] == platform.python_version() and first["argv"] == sys.argv
    assert (first["backend"], first["device_kind"], first["device_count"], first["process_count"]) == \
        ("cpu", "cpu", 8, 1)
    started = datetime.datetime.fromisoformat(first["time"])
    assert started.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.UTC) - started) < datetime.timedelta(minutes=5)
    if shutil.which("git"):  # this checkout: the commit and dirty flag git itself reports
        assert first["git_commit"] == git(provenance.PACKAGE_DIR, "rev-parse", "HEAD").strip()
        assert isinstance(first["git_dirty"], bool)

    stored = records(workdir)
    stored[-1]["packages"]["jax"] = "0.0.1"
    (workdir / layout.RUNS_FILE).write_text("".join(json.dumps(record) + "\n" for record in stored))
    with pytest.warns(provenance.ProvenanceWarning, match=r"packages\.jax: '0\.0\.1' -> ") as caught:
        runner.run_program(config, workdir)
    assert len(caught) == 1 and "time" not in str(caught[0].message).split("what changed:")[1]
    assert len(records(workdir)) == 3 and records(workdir)[-1]["packages"]["jax"] == first["packages"]["jax"]


def test_differences_name_each_changed_key_but_not_the_time():
    old = {"time": "a", "argv": ["x"], "packages": {"jax": "1", "flax": "2"}, "device_count": 8}
    new = {"time": "b", "argv": ["x"], "packages": {"jax": "1", "flax": "3"}, "device_count": 4, "extra": None}
    assert provenance.differences(old, new) == ["device_count: 8 -> 4", "packages.flax: '2' -> '3'"]
    assert provenance.differences(old, {**old, "time": "c"}) == []


def test_no_git_means_no_commit_and_no_failure(config, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # git cannot be found
    assert provenance.git_state() == {"git_commit": None, "git_dirty": None}
    runner.run_program(config, tmp_path / "run")
    [record] = records(tmp_path / "run")
    assert record["git_commit"] is None and record["git_dirty"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_of_a_package_inside_a_checkout_or_not(tmp_path):
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert provenance.git_state(package) == {"git_commit": None, "git_dirty": None}  # no checkout at all
    git(tmp_path / "repo", "init", "-q")
    assert provenance.git_state(package) == {"git_commit": None, "git_dirty": None}  # no commit yet
    (tmp_path / "repo" / "other.py").write_text("")
    git(tmp_path / "repo", "add", "other.py")
    git(tmp_path / "repo", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "other")
    # a checkout that does not track the package (a copy installed in a virtualenv inside some repository)
    assert provenance.git_state(package) == {"git_commit": None, "git_dirty": None}
    git(tmp_path / "repo", "add", "pkg")
    git(tmp_path / "repo", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pkg")
    head = git(tmp_path / "repo", "rev-parse", "HEAD").strip()
    (tmp_path / "repo" / "untracked.txt").write_text("")  # untracked files do not make the tree dirty
    assert provenance.git_state(package) == {"git_commit": head, "git_dirty": False}
    (package / "__init__.py").write_text("x = 1\n")
    assert provenance.git_state(package) == {"git_commit": head, "git_dirty": True}
