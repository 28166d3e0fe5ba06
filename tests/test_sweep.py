"""Sweeps: point helpers and names, skip of complete points on re-run, failure isolation, parallel points,
and the aggregate sweep.json / sweep.md table."""

import json
import textwrap

import ml_collections
import pytest

from sentcomp.errors import SentcompError
from sentcomp.launcher import sweep, sweep_runner
from sentcomp.results import layout

# A tiny program: y = 2x; fails while the file `broken` exists in the shared folder; logs every call.
PROGRAM = textwrap.dedent(
    """
    from pathlib import Path

    def run(config, workdir):
        shared = Path(config.shared)
        with open(shared / "calls.txt", "a") as calls:
            calls.write(f"{config.x}\\n")
        if (shared / "broken").exists() and config.x == 2:
            raise ValueError("x=2 is broken")
        if config.headline_in_results:
            (Path(workdir) / "results.json").write_text('{"y": %d, "curve": [1, 2]}' % (2 * config.x))
            return None
        return {"y": 2 * config.x, "label": f"x{config.x}"}
    """
)


@pytest.fixture
def program(tmp_path, monkeypatch):
    """Makes ``sweep_test_program`` importable here and in sweep subprocesses; returns the base config."""
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "sweep_test_program.py").write_text(PROGRAM)
    monkeypatch.syspath_prepend(str(code_dir))
    monkeypatch.setenv("PYTHONPATH", str(code_dir))
    config = ml_collections.ConfigDict()
    config.program = "sweep_test_program"
    config.shared = str(tmp_path)
    config.x = 0
    config.headline_in_results = False
    config.unused = 1.0
    return config


def calls(config):
    path = config.shared + "/calls.txt"
    with open(path) as file:
        return sorted(int(line) for line in file)


def test_product_zip_and_names():
    grid = sweep.product(sweep.axis("a", [1, 2]),
                         sweep.zip(sweep.axis("b.c", [0.1, 1e-5]), sweep.axis("d", ["x", "y"])))
    assert grid == [
        {"a": 1, "b.c": 0.1, "d": "x"},
        {"a": 1, "b.c": 1e-5, "d": "y"},
        {"a": 2, "b.c": 0.1, "d": "x"},
        {"a": 2, "b.c": 1e-5, "d": "y"},
    ]
    assert sweep.point_names(grid)[1] == "a=1,b.c=1e-05,d=y"
    assert sweep.point_name({}) == "base"
    assert sweep.point_name({"task": "a b/c", "dims": (1, 2)}) == "task=a_b_c,dims=1-2"
    long_a, long_b = sweep.point_name({"k": "x" * 200 + "a"}), sweep.point_name({"k": "x" * 200 + "b"})
    assert len(long_a) == sweep.MAX_NAME_LENGTH and long_a != long_b
    with pytest.raises(SentcompError, match="equal length"):
        sweep.zip(sweep.axis("a", [1, 2]), sweep.axis("b", [1]))
    with pytest.raises(SentcompError, match="'a'"):
        sweep.product(sweep.axis("a", [1]), sweep.axis("a", [2]))
    with pytest.raises(SentcompError, match="more than once"):
        sweep.point_names([{"a": 1}, {"a": 1}])


def test_failure_is_isolated_and_rerun_skips_complete_points(program, tmp_path):
    (tmp_path / "broken").touch()
    points = sweep.axis("x", [1, 2, 3])
    rows = sweep_runner.run_sweep(program, points, tmp_path / "sweep")
    assert [row["status"] for row in rows] == ["done", "failed", "done"]
    assert [row["metrics"].get("y") for row in rows] == [2, None, 6]
    assert "x=2 is broken" in rows[1]["error"]
    assert "Traceback" in (tmp_path / "sweep" / "x=2" / layout.ERROR_FILE).read_text()
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"] == json.loads(json.dumps(rows))
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| x=3 | done | 3 | 6 | x3 |" in table and "x=2 is broken" in table

    (tmp_path / "broken").unlink()
    rows = sweep_runner.run_sweep(program, points, tmp_path / "sweep")
    assert [row["status"] for row in rows] == ["reused", "done", "reused"]
    assert [row["metrics"]["y"] for row in rows] == [2, 4, 6]
    assert calls(program) == [1, 2, 2, 3]  # only the failed point ran again
    assert not (tmp_path / "sweep" / "x=2" / layout.ERROR_FILE).exists()


def test_complete_point_with_a_changed_config_is_reported_not_reused(program, tmp_path):
    sweep_runner.run_sweep(program, sweep.axis("x", [1]), tmp_path / "sweep")
    program.unused = 2.0
    (row,) = sweep_runner.run_sweep(program, sweep.axis("x", [1]), tmp_path / "sweep")
    assert row["status"] == "failed" and "unused: 1.0 -> 2.0" in row["error"]
    assert calls(program) == [1]


def test_headline_from_results_json_when_run_returns_none(program, tmp_path):
    program.headline_in_results = True
    (row,) = sweep_runner.run_sweep(program, sweep.axis("x", [5]), tmp_path / "sweep")
    assert row["metrics"] == {"y": 10}  # the list-valued entry is not a headline


@pytest.mark.slow
def test_parallel_points_run_in_subprocesses(program, tmp_path):
    (tmp_path / "broken").touch()
    rows = sweep_runner.run_sweep(program, sweep.axis("x", [1, 2, 3]), tmp_path / "sweep", parallel_points=3)
    assert [row["status"] for row in rows] == ["done", "failed", "done"]
    assert "x=2 is broken" in rows[1]["error"]
    assert rows[2]["metrics"] == {"y": 6, "label": "x3"}
    assert calls(program) == [1, 2, 3]
    assert (tmp_path / "sweep" / "x=2" / layout.LOG_FILE).exists()


def test_bad_points_fail_before_any_point_runs(program, tmp_path):
    with pytest.raises(SentcompError, match="Unknown config key 'y'.*Valid keys: headline_in_results, program"):
        sweep_runner.run_sweep(program, [{"x": 1}, {"y": 1}], tmp_path / "sweep")
    with pytest.raises(SentcompError, match="config.x = 'a' has the wrong type"):
        sweep_runner.run_sweep(program, [{"x": 1}, {"x": "a"}], tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()
