"""One table across runs: any set of workdirs (and sweep folders) of any program, merged and pivoted.

    python -m sentcomp.report DIR [DIR ...] [--rows=run,row] [--columns=column] [--metric=a,b] [--out=report]

writes ``OUTDIR/report.md`` (printed too), ``report.csv``, ``report.json`` and PNG figures (docs/report.md).

The pipeline, one small function per step:

1. **runs** (:func:`find_runs`): each DIR is a workdir (``config.json``; ``done.json`` once finished,
   ``error.txt`` when it failed in a sweep) or a sweep folder (``sweep.json`` and one workdir per point), which
   expands into its points. A run's status is ``done``, ``unfinished`` (no ``done.json``) or ``failed``.
2. **records** (:func:`run_records`): long format, one measurement each: ``run, sweep, program, status, model,
   row, column, metric, repeat, value, n`` plus the config fields that differ between runs of a program (the
   swept hyperparameters, a model, a subset size). Table-1 runs give one record per cell and split (``metric``
   ``test_accuracy``, ``n`` the test-set size from ``results.json``); other programs one per ``done.json``
   headline entry (``column`` = ``metric`` = its name). Only finished runs have records; unfinished and failed
   ones are listed in a section of their own.
3. **pivot** (:func:`sentcomp.results.tables.pivot`): rows and columns are any record fields; the records of
   one cell are pooled (accuracies: test predictions pooled, so splits and runs count by their test-set sizes)
   and every accuracy gets its 95% Wilson score interval.
4. **files** (:func:`write_report`), with :mod:`sentcomp.results.plots` for the figures: Table-1 accuracies as
   grouped bars with their intervals (``accuracy.png``), training curves of every ``metrics.jsonl`` per program
   (``curves_<program>.png``), and each sweep's headline metrics against its hyperparameters
   (``sweep_<sweep>.png``).

It reads files only (no JAX), so it runs anywhere the workdirs are, even while the runs are still going.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sentcomp.errors import SentcompError
from sentcomp.results import layout, plots, storage, tables
from sentcomp.results.tables import CAPTION

LAYOUT = (f"a workdir holds {layout.CONFIG_FILE} ({layout.DONE_FILE} once finished, {layout.ERROR_FILE} if it failed); "
          f"a sweep folder holds {layout.SWEEP_FILE} and one workdir per point (sentcomp.results.layout)")

BASE_FIELDS = ("run", "sweep", "program", "status", "model", "row", "column", "metric", "repeat")
DEFAULT_ROWS = ("run", "row")
DEFAULT_COLUMNS = ("column",)



class ReportError(SentcompError):
    """A DIR or an option the report cannot use; the message says which and what it expected."""


@dataclasses.dataclass
class Run:
    """One workdir: where it is, what ran there, how far it got."""

    name: str  # shortest unique tail of its path among the report's runs
    path: Path
    program: str  # the program module's last part: table1, pretrain, ...
    status: str  # done, unfinished, failed
    config: dict[str, Any]  # config.json flattened to dotted keys
    headline: dict[str, Any]  # done.json
    error: str | None = None  # a failed run's last error line
    sweep: str = ""  # the sweep folder's name, for sweep points
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the sweep point's hyperparameters


# --------------------------------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if there is no such file; a file that is not valid JSON or holds
    another JSON value (a list, a number) is a :class:`ReportError` naming it."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path} holds a JSON {type(value).__name__}, expected an object ({{...}}): restore it, "
                          "or leave that folder out of the report.")
    return value


def last_line(text: str) -> str:
    """The last non-blank line (of a traceback: the exception and its message)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(empty)"


def is_workdir(path: Path) -> bool:
    """A run's folder: it has config.json, or at least error.txt (a sweep point that failed before starting)."""
    return (path / layout.CONFIG_FILE).is_file() or (path / layout.ERROR_FILE).is_file()


def sweep_point_dirs(folder: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """The points of a sweep folder as ``(workdir, its sweep.json row or None)``: the rows of sweep.json, then
    any other workdir inside (a sweep still running has no sweep.json yet)."""
    rows = (read_json(folder / layout.SWEEP_FILE) or {}).get("rows", [])
    points = [(folder / row["name"], row) for row in rows]
    listed = {path.name for path, _ in points}
    points += [(path, None) for path in sorted(folder.iterdir())
               if path.is_dir() and path.name not in listed and is_workdir(path)]
    return points


def locate(dirs: Sequence[str | Path]) -> list[tuple[Path, Path | None, dict[str, Any] | None]]:
    """Every run the DIRs name, as ``(workdir, sweep folder or None, sweep.json row or None)``, each once."""
    found: dict[Path, tuple[Path, Path | None, dict[str, Any] | None]] = {}
    for given in dirs:
        path = Path(given).resolve()
        if path.is_dir() and is_workdir(path):
            found.setdefault(path, (path, None, None))
            continue
        points = sweep_point_dirs(path) if path.is_dir() else []
        if not points and not (path / layout.SWEEP_FILE).is_file():
            what = "does not exist" if not path.exists() else "is not a workdir or sweep folder"
            raise ReportError(f"{given} {what}: {LAYOUT}.")
        for point, row in points:
            found.setdefault(point, (point, path, row))
    return list(found.values())


def short_names(paths: Sequence[Path]) -> list[str]:
    """For each path the fewest trailing components that tell it apart from the others (``sweep/point``)."""
    names = []
    for path in paths:
        for depth in range(1, len(path.parts) + 1):
            tail = Path(*path.parts[-depth:])
            if sum(other.parts[-depth:] == tail.parts for other in paths) == 1:
                break
        names.append(tail.as_posix())
    return names


def program_name(config: dict[str, Any]) -> str:
    """``sentcomp.programs.table1`` → ``table1`` ("" when the config names none)."""
    return str(config.get("program", "")).rsplit(".", 1)[-1]


def model_name(config: dict[str, Any]) -> str:
    """The model a (flat) config uses: its name or source, or the shape of a model trained from scratch."""
    if config.get("init.source"):
        return str(config["init.source"])
    if isinstance(config.get("model"), str):
        return config["model"]
    shape = [f"{key}={config[f'model.{key}']}" for key in ("n_layer", "n_embd") if f"model.{key}" in config]
    return ",".join(shape)


def run_status(path: Path) -> tuple[str, str | None]:
    """``("failed", last error line)``, ``("done", None)`` or ``("unfinished", None)``: a ``done.json`` written
    after the ``error.txt`` (a later run completed the point) is trusted over it."""
    error, done = path / layout.ERROR_FILE, path / layout.DONE_FILE
    if error.is_file() and not (done.is_file() and done.stat().st_mtime_ns >= error.stat().st_mtime_ns):
        return "failed", last_line(error.read_text())
    return ("done" if done.is_file() else "unfinished"), None


def read_run(path: Path, name: str, sweep: str = "", sweep_row: dict[str, Any] | None = None) -> Run:
    """A workdir's record as a :class:`Run`; a sweep.json row supplies the point's hyperparameters and, for a
    point that failed before it had a folder, the error."""
    status, error = run_status(path)
    if status == "unfinished" and sweep_row and sweep_row.get("status") == "failed":
        status, error = "failed", sweep_row.get("error") or "failed (sweep.json)"
    config = storage.flatten(read_json(path / layout.CONFIG_FILE) or {})
    return Run(name=name, path=path, program=program_name(config), status=status, config=config,
               headline=read_json(path / layout.DONE_FILE) or {}, error=error, sweep=sweep,
               params=dict((sweep_row or {}).get("params") or {}))


def find_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """The runs of every DIR (sweep folders expanded), named by the shortest unique tail of their path; a sweep
    point as ``<sweep>/<point>``."""
    located = locate(dirs)
    paths = [path for path, _, _ in located]
    sweeps = list(dict.fromkeys(sweep for _, sweep, _ in located if sweep is not None))
    sweep_names = dict(zip(sweeps, short_names(sweeps)))
    names = [f"{sweep_names[sweep]}/{path.name}" if sweep else name
             for (path, sweep, _), name in zip(located, short_names(paths))]
    if len(set(names)) < len(names):  # a workdir named like some sweep's point: plain path tails instead
        names = short_names(paths)
    runs = [read_run(path, name, sweep_names[sweep] if sweep else "", row)
            for (path, sweep, row), name in zip(located, names)]
    for sweep in sweep_names.values():  # no sweep.json yet: the hyperparameters are what the points' configs vary
        points = [run for run in runs if run.sweep == sweep]
        if not any(run.params for run in points):
            keys = [key for key in differing_keys([run.config for run in points]) if key != "program"]
            for run in points:
                run.params = {key: run.config.get(key) for key in keys}
    return runs


# --------------------------------------------------------------------------------------------------- records


def headline_cells(headline: dict[str, Any]) -> list[dict[str, Any]]:
    """Records (without run fields) of a ``done.json``: one per entry, ``column`` = ``metric`` = its name."""
    return [{"row": "", "column": key, "metric": key, "repeat": None, "value": value, "n": None}
            for key, value in headline.items() if isinstance(value, (int, float, str))]


def measurements(run: Run) -> list[dict[str, Any]]:
    """A finished run's records without run fields: Table-1 cells (from results.json, else cells.jsonl), or the
    done.json headline."""
    if run.program == "table1":
        results = (read_json(run.path / layout.RESULTS_FILE)
                   or {"cells": storage.read_json_lines(run.path / layout.CELLS_FILE)})
        cells = tables.table1_cells(results)
        if cells:
            return cells
    return headline_cells(run.headline)


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The keys whose values are not the same in every (flat) config (a missing key counts as a value)."""
    keys = dict.fromkeys(key for config in configs for key in config)
    return [key for key in keys if len({json.dumps(config.get(key), sort_keys=True) for config in configs}) > 1]


def field_name(key: str) -> str:
    """A config key as a record field (``config.`` in front when it would shadow a base field, e.g. ``model``)."""
    return f"config.{key}" if key in BASE_FIELDS or key in ("value", "n") else key


def varying_fields(runs: Sequence[Run]) -> list[str]:
    """The config keys that differ between the runs of one program (``program`` aside), in first-seen order."""
    keys: dict[str, None] = {}
    for program in dict.fromkeys(run.program for run in runs):
        keys.update(dict.fromkeys(differing_keys([run.config for run in runs if run.program == program])))
    keys.pop("program", None)
    return list(keys)


def field_value(value: Any) -> Any:
    """A config value as a table entry: scalars as they are, lists and dicts as compact JSON, missing as ""."""
    if value is None:
        return ""
    return value if isinstance(value, (int, float, str)) else json.dumps(value, separators=(",", ":"))


def run_records(run: Run, config_keys: Sequence[str]) -> list[dict[str, Any]]:
    """The long-format records of one finished run (none for an unfinished or failed one), each with the run's
    fields and the values of ``config_keys``."""
    if run.status != "done":
        return []
    fields = {"run": run.name, "sweep": run.sweep, "program": run.program, "status": run.status,
              "model": model_name(run.config),
              **{field_name(key): field_value(run.config.get(key)) for key in config_keys}}
    return [{**fields, **measurement} for measurement in measurements(run)]


def metrics_files(path: Path) -> list[tuple[str, Path]]:
    """Every ``metrics.jsonl`` of a workdir, at most two folders deep, as ``(sub-folder or "", file)``
    (theory_synthetic logs ``<loss>/metrics.jsonl``; Table-1 fine-tuning ``finetune/<row>-<split>/``)."""
    name = layout.METRICS_FILE
    found = [path / name, *sorted(path.glob(f"*/{name}")), *sorted(path.glob(f"*/*/{name}"))]
    return [("" if file.parent == path else file.parent.relative_to(path).as_posix(), file)
            for file in found if file.is_file()]


def progress(run: Run) -> str:
    """How far an unfinished run got (cells done, last logged step), or why a failed one failed."""
    if run.status == "failed":
        return run.error or "failed"
    parts = []
    cells = [cell for cell in storage.read_json_lines(run.path / layout.CELLS_FILE) if "column" in cell]
    if cells:
        parts.append(f"{len(cells)} Table-1 cells done")
    for sub, file in metrics_files(run.path):
        steps = [row["step"] for row in storage.read_json_lines(file) if plots.is_number(row.get("step"))]
        if steps:
            parts.append(f"{sub + ': ' if sub else ''}last logged step {max(steps)}")
    return "; ".join(parts) or ("no done.json and no results yet" if (run.path / layout.CONFIG_FILE).is_file()
                                else "no config.json")


# ------------------------------------------------------------------------------------------------------ pivot


# ---------------------------------------------------------------------------------------------------- figures


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "runs"


def write_figures(runs: Sequence[Run], records: Sequence[dict[str, Any]], outdir: Path) -> list[Path]:
    """``accuracy.png`` (Table-1 runs), ``curves_<program>.png`` (every metrics.jsonl, one line per run and
    sub-folder), ``sweep_<sweep>.png`` (each sweep's numeric headline metrics against its hyperparameters)."""
    written = []
    accuracy = [record for record in records if record["program"] == "table1"]
    if accuracy:
        several = len({record["run"] for record in accuracy}) > 1
        groups = tables.accuracy_groups(accuracy, ("run", "row") if several else ("row",))
        if groups:
            written.append(plots.accuracy_bars(groups, outdir / "accuracy.png", "Table 1: test accuracy"))
    for program in dict.fromkeys(run.program for run in runs):
        curves = {f"{run.name}/{sub}" if sub else run.name: storage.read_json_lines(file)
                  for run in runs if run.program == program for sub, file in metrics_files(run.path)}
        if any(plots.metric_series(rows) for rows in curves.values()):
            written.append(plots.training_curves(curves, outdir / f"curves_{slug(program)}.png",
                                                 f"{program}: metrics.jsonl against step"))
    for sweep in dict.fromkeys(run.sweep for run in runs if run.sweep):
        done = [run for run in runs if run.sweep == sweep and run.status == "done"]
        swept = swept_keys([run.params for run in done])
        points = [({key: run.params.get(key) for key in swept}, run.headline) for run in done]
        if swept and any(plots.is_number(value) for _, headline in points for value in headline.values()):
            written.append(plots.sweep_points(points, outdir / f"sweep_{slug(sweep)}.png", f"sweep {sweep}"))
    return written


def swept_keys(params: Sequence[dict[str, Any]]) -> list[str]:
    """The hyperparameters of sweep points that take more than one value (all of them if none does)."""
    keys = list(dict.fromkeys(key for point in params for key in point))
    return differing_keys(params) or keys


# ----------------------------------------------------------------------------------------------------- report


@dataclasses.dataclass
class Report:
    runs: list[Run]
    config_keys: list[str]  # the config fields the records carry
    records: list[dict[str, Any]]
    table: tables.Table


def parse_fields(text: str) -> tuple[str, ...]:
    """``"run,row"`` → ``("run", "row")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_report(dirs: Sequence[str | Path], rows: Sequence[str] = DEFAULT_ROWS,
                 columns: Sequence[str] = DEFAULT_COLUMNS, metrics: Sequence[str] = ()) -> Report:
    """Runs → records → the pivot by ``rows`` × ``columns``, keeping only ``metrics`` (all when empty)."""
    runs = find_runs(dirs)
    all_keys = list(dict.fromkeys(key for run in runs for key in run.config))
    varying = varying_fields(runs)
    available = [*BASE_FIELDS, *(field_name(key) for key in all_keys)]
    unknown = [field for field in (*rows, *columns) if field not in available]
    if unknown:
        raise ReportError(f"unknown field(s) {unknown} for --rows/--columns; the records have {available}.")
    asked = [key for key in all_keys if field_name(key) in (*rows, *columns)]
    config_keys = list(dict.fromkeys([*varying, *asked]))
    records = [record for run in runs for record in run_records(run, config_keys)]
    if metrics:
        present = list(dict.fromkeys(record["metric"] for record in records))
        missing = [metric for metric in metrics if metric not in present]
        if missing:
            raise ReportError(f"--metric {missing} not found; the finished runs have the metrics {present}.")
        records = [record for record in records if record["metric"] in metrics]
    return Report(runs, config_keys, records, tables.pivot(records, rows, columns))


def runs_markdown(report: Report) -> str:
    """The runs, with their program, status, model and the config fields that differ between runs."""
    keys = report.config_keys
    return tables.markdown_table(["run", "program", "status", "model", *keys, "path"],
                          ([run.name, run.program, run.status, model_name(run.config),
                            *(field_value(run.config.get(key)) for key in keys), run.path] for run in report.runs))


def report_markdown(report: Report, figures: Sequence[Path]) -> str:
    counts = {status: sum(run.status == status for run in report.runs) for status in ("done", "unfinished", "failed")}
    pending = [run for run in report.runs if run.status != "done"]
    parts = [f"# Report: {len(report.runs)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())})",
             tables.table_markdown(report.table) if report.records else "No finished run has a metric to show.",
             CAPTION,
             "## Unfinished and failed runs (not in the table)",
             tables.markdown_table(["run", "program", "status", "details"],
                            ([run.name, run.program, run.status, progress(run)] for run in pending))
             if pending else "None: every run finished.",
             "## Runs", runs_markdown(report)]
    if figures:
        parts += ["## Figures", *(f"![{figure.stem}]({figure.name})" for figure in figures)]
    return "\n\n".join(parts) + "\n"


def report_json(report: Report, figures: Sequence[Path]) -> dict[str, Any]:
    runs = [{"run": run.name, "path": str(run.path), "program": run.program, "status": run.status,
             "model": model_name(run.config), "sweep": run.sweep, "params": run.params, "error": run.error,
             "progress": progress(run) if run.status != "done" else None, "headline": run.headline}
            for run in report.runs]
    return {**tables.table_json(report.table), "runs": runs, "records": report.records,
            "figures": [figure.name for figure in figures]}


def write_report(report: Report, outdir: str | Path) -> str:
    """Writes ``report.md``, ``report.csv``, ``report.json`` and the figures into ``outdir``; returns the Markdown."""
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        figures = write_figures(report.runs, report.records, outdir)
        markdown = report_markdown(report, figures)
        storage.write_text(outdir / "report.md", markdown)
        storage.write_text(outdir / "report.csv", tables.table_csv(report.table))
        storage.write_json(outdir / "report.json", report_json(report, figures))
    except OSError as error:  # --out is a file or under one, read-only, full: the user's to fix
        if not isinstance(error, (FileExistsError, NotADirectoryError)) and storage.write_failure_cause(error) is None:
            raise
        raise ReportError(f"Cannot write the report into --out={outdir} ({error.strerror or error}): pass a folder "
                          "you can write (created if missing).") from None
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sentcomp.report",
        description="Merge workdirs and sweep folders of any program into one table (Markdown, CSV, JSON) and "
                    "figures. Fields for --rows/--columns: " + ", ".join(BASE_FIELDS) + " and config keys.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="workdirs and sweep folders")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="record fields of the table's rows")
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS), help="record fields of its columns")
    parser.add_argument("--metric", default="", help="keep only these metrics (comma-separated; default: all)")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.dirs, parse_fields(args.rows), parse_fields(args.columns),
                              parse_fields(args.metric))
        print(write_report(report, args.out))
    except (ReportError, tables.TableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
