"""sentcomp.report and sentcomp.results.plots: workdirs written in the real on-disk layout (Table-1 runs, a pretraining
sweep with a failed point, an unfinished run) and the real Table-1 smoke run, merged into one table whose numbers
are checked against the files, with Wilson intervals checked against scipy; pivots, the CLI's error line, the
figures (read back by matplotlib)."""

import csv
import json
import subprocess
import sys

import matplotlib.image
import pytest
from scipy.stats import binomtest

from sentcomp import report
from sentcomp.results import plots, statistics, storage, tables

TABLE1 = "sentcomp.programs.table1"
PRETRAIN = "sentcomp.programs.pretrain"


def write(path, files):
    """Writes ``{name: JSON value, or list of rows for .jsonl, or text}`` into the folder ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        if name.endswith(".jsonl"):
            value = "".join(json.dumps(row) + "\n" for row in value)
        (path / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def cell(row, column, accuracy, repeat=0):
    return {"key": f"{row}/{column}/{repeat}", "row": row, "column": column, "repeat": repeat,
            "test_accuracy": accuracy}


def table1_run(path, model, accuracies, done=True):
    """A Table-1 workdir: sst2 (official split, 50 test examples) and mpqa (pooled, 2 splits of 20)."""
    cells = [cell("sst2", "f", accuracies[0]), cell("sst2*", "f", accuracies[1]), cell("sst2*", "zeroshot", 0.6),
             cell("mpqa", "f", 0.75, 0), cell("mpqa", "f", 0.85, 1)]
    files = {"config.json": {"program": TABLE1, "model": model, "n_train": 100, "tasks": ["sst2", "mpqa"]},
             "cells.jsonl": [{"key": "sst2/metadata", "word_sets": {}}, *cells]}
    if done:
        files["results.json"] = {"model": model, "columns": ["f", "zeroshot"], "cells": cells,
                                 "tasks": [{"name": "sst2", "n_test": 50, "n_splits": 1},
                                           {"name": "mpqa", "n_test": 20, "n_splits": 2}]}
        files["done.json"] = {f"{c['row']}/{c['column']}": c["test_accuracy"] for c in cells}
    return write(path, files)


def pretrain_point(path, loss, rate, failed=False):
    config = {"program": PRETRAIN, "loss": loss, "optimizer": {"learning_rate": rate, "b1": 0.9},
              "model": {"n_layer": 2, "n_embd": 32}, "init": {"source": ""}}
    files = {"config.json": config}
    steps = [{"step": s, "train_loss": 5.0 / s + rate, "val_loss": 4.0 / s + rate, "tokens_per_s": 100.0 * s,
              "probe_f": 0.5 + 0.01 * s} for s in (10, 20)]
    files["metrics.jsonl"] = steps[:1] if failed else steps
    if failed:
        files["error.txt"] = "Traceback (most recent call last):\n ...\nTrainingDiverged: Training diverged at step 7\n"
    else:
        files["done.json"] = {"loss": loss, "steps": 20, "val_loss": steps[-1]["val_loss"], "probe_f": 0.7}
    return write(path, files)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished Table-1 runs (other models), one unfinished, and a 3-point pretraining sweep (one failed)."""
    root = tmp_path_factory.mktemp("runs")
    table1_run(root / "small", "gpt2", (0.8, 0.9))
    table1_run(root / "medium", "gpt2-medium", (0.86, 0.94))
    table1_run(root / "killed", "gpt2-large", (0.5, 0.5), done=False)
    sweep = root / "sweep"
    points = [("xent", 0.001, False), ("xent", 0.01, True), ("quad", 0.001, False)]
    rows = []
    for loss, rate, failed in points:
        name = f"loss={loss},optimizer.learning_rate={rate}"
        pretrain_point(sweep / name, loss, rate, failed)
        rows.append({"name": name, "status": "failed" if failed else "done", "error": "diverged" if failed else None,
                     "params": {"loss": loss, "optimizer.learning_rate": rate}, "metrics": {}})
    write(sweep, {"sweep.json": {"rows": rows}})
    return root


def accuracies_from_files(workdir):
    """``{(row, column): [accuracy per split]}`` and ``{task: n_test}`` read straight from a Table-1 workdir."""
    found = {}
    for line in (workdir / "cells.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "column" in entry:
            found.setdefault((entry["row"], entry["column"]), []).append(entry["test_accuracy"])
    tasks = json.loads((workdir / "results.json").read_text())["tasks"]
    return found, {task["name"]: task["n_test"] for task in tasks}


def check_accuracy_cells(table, run, workdir):
    """Every (row, column) of a Table-1 workdir is in ``table`` with the pooled accuracy of its splits and the
    Wilson interval scipy computes for it."""
    found, n_test = accuracies_from_files(workdir)
    for (row, column), accuracies in found.items():
        got = table.cells[((run, row), (column,))]
        n = n_test[row.rstrip("*")] * len(accuracies)
        successes = round(sum(accuracies) * n_test[row.rstrip("*")])
        expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert got["value"] == pytest.approx(sum(accuracies) / len(accuracies), abs=1e-6)
        assert got["n"] == n
        assert (got["low"], got["high"]) == pytest.approx((expected.low, expected.high), abs=1e-12)
    rows = dict.fromkeys(row for row, _ in found)
    assert [key for key in table.row_keys if key[0] == run] == [(run, row) for row in rows]
    return found


def test_wilson_interval_by_hand():
    # 40 of 50: p = 0.8, z² = 3.8415; centre (0.8 + 0.038415) / 1.07683 = 0.77859; half-width
    # 1.96 / 1.07683 * sqrt(0.0032 + 0.000384) = 0.10897
    low, high = statistics.wilson_interval(40, 50)
    assert (low, high) == pytest.approx((0.66963, 0.88756), abs=1e-5)
    assert statistics.wilson_interval(0, 10)[0] == 0.0 and statistics.wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_table_holds_the_cells_accuracies_with_their_intervals(runs):
    built = report.build_report([runs / "small", runs / "medium"])
    assert (built.table.rows, built.table.columns) == (("run", "row"), ("column",))
    assert built.table.column_keys == [("f",), ("zeroshot",)]
    assert [key[1] for key in built.table.row_keys[:3]] == ["sst2", "sst2*", "mpqa"]
    for run in ("small", "medium"):
        assert len(check_accuracy_cells(built.table, run, runs / run)) == 4
    assert built.config_keys == ["model"]  # the only config field that differs
    assert {record["config.model"] for record in built.records} == {"gpt2", "gpt2-medium"}


def test_sweep_folder_expands_and_unfinished_and_failed_runs_are_listed(runs, tmp_path):
    built = report.build_report([runs / "sweep", runs / "small", runs / "killed"])
    status = {run.name: run.status for run in built.runs}
    assert status == {"sweep/loss=xent,optimizer.learning_rate=0.001": "done",
                      "sweep/loss=xent,optimizer.learning_rate=0.01": "failed",
                      "sweep/loss=quad,optimizer.learning_rate=0.001": "done", "small": "done", "killed": "unfinished"}
    assert {record["run"] for record in built.records} == {name for name, s in status.items() if s == "done"}
    assert {"loss", "optimizer.learning_rate", "model"} <= set(built.config_keys)
    point = next(run for run in built.runs if run.status == "failed")
    assert point.params == {"loss": "xent", "optimizer.learning_rate": 0.01} and "diverged at step 7" in point.error

    markdown = report.write_report(built, tmp_path)
    pending = markdown.split("## Unfinished and failed runs")[1].split("## Runs")[0]
    assert "| sweep/loss=xent,optimizer.learning_rate=0.01 | pretrain | failed | TrainingDiverged: Training " \
           "diverged at step 7 |" in pending
    assert "| killed | table1 | unfinished | 5 Table-1 cells done |" in pending
    assert "3 done, 1 unfinished, 1 failed" in markdown and "Wilson" in markdown


def test_rows_and_columns_change_the_pivot(runs):
    by_model = report.build_report([runs / "small", runs / "medium"], rows=("row",), columns=("model",))
    assert by_model.table.column_keys == [("gpt2",), ("gpt2-medium",)]
    assert by_model.table.cells[(("sst2",), ("gpt2-medium",))]["value"] == pytest.approx(0.86)
    pooled = report.build_report([runs / "small", runs / "medium"], rows=("column",), columns=())
    assert pooled.table.cells[(("f",), ())]["n"] == 2 * (50 + 50 + 40)  # both runs' rows, test sets pooled

    sweep = report.build_report([runs / "sweep"], rows=("optimizer.learning_rate",), columns=("loss",),
                                metrics=("val_loss",))
    assert sweep.table.row_keys == [(0.001,)] and sweep.table.column_keys == [("xent",), ("quad",)]
    assert sweep.table.cells[((0.001,), ("quad",))]["value"] == pytest.approx(4.0 / 20 + 0.001)
    with pytest.raises(tables.TableError, match="mix the metrics"):
        report.build_report([runs / "sweep"], rows=("run",), columns=())
    with pytest.raises(report.ReportError, match="unknown field"):
        report.build_report([runs / "sweep"], rows=("learning_rate",))


def test_cli_writes_table_and_figures(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(runs / "small"), str(runs / "medium"), str(runs / "sweep"), f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "report.md").read_text().strip()
    assert "| small | sst2 | 80.0 [67.0, 88.8] | — |" in printed  # 40/50 with its Wilson interval (by hand above)
    rows = list(csv.DictReader((out / "report.csv").open()))
    small_sst2 = next(row for row in rows if row["run"] == "small" and row["row"] == "sst2")
    assert float(small_sst2["f"]) == pytest.approx(0.8) and float(small_sst2["f low"]) == pytest.approx(0.66963, 1e-4)
    saved = json.loads((out / "report.json").read_text())
    assert saved["rows"] == ["run", "row"] and len(saved["runs"]) == 5 and "Wilson" in saved["caption"]
    figures = {"accuracy.png", "curves_pretrain.png", "sweep_sweep.png"}
    assert set(saved["figures"]) == figures
    for name in figures:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_cli_error_line_for_a_dir_that_is_not_a_run(make, runs, tmp_path):
    bad = tmp_path / "not_a_run"
    if make == "empty":
        bad.mkdir()
    elif make == "file":
        bad.write_text("hello")
    completed = subprocess.run([sys.executable, "-m", "sentcomp.report", str(runs / "small"), str(bad),
                                f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.count("\n") == 1 and completed.stderr.startswith(f"error: {bad} ")
    assert "config.json" in completed.stderr and "sweep.json" in completed.stderr


def test_training_curves_from_a_metrics_file(tmp_path):
    """A fine-tuning metrics.jsonl as sentcomp.training.finetune writes it; nested rows give dotted metric names."""
    rows = [{"step": s, "train_loss": 1.0 / s, "val_accuracy": 0.5 + s / 100, "best_val": 0.6, "best_step": 10,
             "bad_evals": 0, "nested": {"a": s, "text": "x"}} for s in (10, 20, 30)]
    write(tmp_path, {"metrics.jsonl": rows})
    series = plots.metric_series(storage.read_json_lines(tmp_path / "metrics.jsonl"))
    assert series["nested.a"] == [(10, 10), (20, 20), (30, 30)] and "nested.text" not in series
    path = plots.training_curves({"run": rows}, tmp_path / "curves.png", prefixes=plots.LEARNING_CURVES)
    assert matplotlib.image.imread(path).shape[2] in (3, 4)
    with pytest.raises(ValueError, match="no numeric metrics"):
        plots.training_curves({"run": [{"step": 1, "text": "x"}]}, tmp_path / "none.png")


def test_table1_smoke_run_has_its_figure_and_reports_its_cells(smoke_workdir, tmp_path):
    workdir = smoke_workdir("table1")
    image = matplotlib.image.imread(workdir / "results.png")
    assert image.ndim == 3 and image.std() > 0
    assert "](results.png)" in (workdir / "results.md").read_text()
    built = report.build_report([workdir])
    check_accuracy_cells(built.table, workdir.name, workdir)
    report.write_report(built, tmp_path)
    assert matplotlib.image.imread(tmp_path / "accuracy.png").ndim == 3
