"""Running a sweep: every point of a config file's ``get_sweep()`` (:mod:`sentcomp.launcher.sweep`) into
``DIR/<point-name>/``::

    python -m sentcomp.main --config=experiments/X.py --workdir=DIR --sweep [--parallel=4]

Every point is validated (keys exist, types fit) before the first one runs. Points run one after another
in this process, or ``parallel`` at a time in subprocesses (``python -m sentcomp.launcher.sweep_runner``; output
in ``DIR/<point>/log.txt``), which suits CPU work; on accelerators run them one at a time so each point has
every device (with several hosts, points always run one at a time, all hosts together).

Each point goes through :func:`sentcomp.launcher.runner.run_program`, whose ``done.json`` marks it complete and
holds its headline metrics (the dict the program's ``run`` returns, or the scalars of its ``results.json``; see
:mod:`sentcomp.launcher.runner`). On a re-run, complete points are skipped (after checking their recorded config
still matches). A failing point leaves its traceback in ``DIR/<point>/error.txt`` and the others go on.
At the end ``DIR/sweep.json`` and ``DIR/sweep.md`` hold one row per point: its status (``done``, ``reused``:
complete from an earlier run, ``failed``), hyperparameters and headline metrics; when the config has a
``sweep_selection`` group (``{label: headline metric}``, e.g. ``{"xent": "xent/val_loss"}``), they also name, per
label, the complete point with the lowest value of that metric (model selection by a validation metric).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from sentcomp import parallel
from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files, runner
from sentcomp.launcher.sweep import Point, format_value, point_names
from sentcomp.results import layout, storage
from sentcomp.results.tables import markdown_table

SELECTION = "sweep_selection"  # optional config group {label: headline metric}; sweep.md names each minimiser


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def run_point(config: ml_collections.ConfigDict, point_dir: Path) -> tuple[str, str | None]:
    """Runs one point in this process: ``("done", None)`` or ``("failed", reason)`` (traceback in error.txt; the
    run clears an earlier one when it starts). A point another run is writing is left untouched."""
    try:
        runner.run_program(config, point_dir)
        return "done", None
    except runner.WorkdirBusy as error:
        return "failed", str(error)
    except Exception:  # one failing point must not stop the sweep
        details = traceback.format_exc()
        if parallel.is_main_process():
            point_dir.mkdir(parents=True, exist_ok=True)
            storage.write_text(point_dir / layout.ERROR_FILE, details)
        return "failed", _last_line(details)


def _run_point_in_subprocess(config: ml_collections.ConfigDict, point_dir: Path) -> tuple[str, str | None]:
    """Runs one point with ``python -m sentcomp.launcher.sweep_runner`` (config pickled on stdin, output in log.txt);
    a point another run is writing is left untouched (its log.txt is that run's)."""
    holder = runner.busy(point_dir) if point_dir.is_dir() else None
    if holder is not None:
        return "failed", str(holder)
    point_dir.mkdir(parents=True, exist_ok=True)
    with open(point_dir / layout.LOG_FILE, "wb") as log:
        exit_code = subprocess.run(
            [sys.executable, "-m", "sentcomp.launcher.sweep_runner"],
            input=pickle.dumps((config, point_dir)),
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    if exit_code == 0:
        return "done", None
    error_file = point_dir / layout.ERROR_FILE
    if error_file.exists():
        return "failed", _last_line(error_file.read_text())
    last_line = _last_line((point_dir / layout.LOG_FILE).read_text())
    reason = f"the point's process exited with code {exit_code}: {last_line}"
    storage.write_text(error_file, reason + "\n")
    return "failed", reason


def _already_done(config: ml_collections.ConfigDict, point_dir: Path) -> tuple[str, str | None] | None:
    """``("reused", None)`` for a complete point whose config still matches, a failure if it does not,
    None if the point still has to run."""
    if runner.read_done(point_dir) is None:
        return None
    try:
        runner.check_resume(config, point_dir)
    except SentcompError as error:
        return "failed", str(error)
    return "reused", None


def run_sweep(
    config: ml_collections.ConfigDict, points: list[Point], sweep_dir: str | Path, parallel_points: int = 1
) -> list[dict[str, Any]]:
    """Runs every point of the sweep into ``sweep_dir/<point-name>/`` and writes sweep.json and sweep.md.

    Returns the table's rows (see :func:`aggregate`).
    """
    sweep_dir = Path(sweep_dir)
    names = point_names(points)
    configs = [config_files.override(config, point) for point in points]  # every point is checked up front
    if parallel_points > 1 and jax.process_count() > 1:
        raise SentcompError("--parallel runs points in subprocesses of one host; with several hosts use --parallel=1.")
    done = {name: _already_done(cfg, sweep_dir / name) for name, cfg in zip(names, configs)}
    to_run = parallel.broadcast_from_main(np.array([done[name] is None for name in names]))
    pending = [(name, cfg) for name, cfg, run in zip(names, configs, to_run) if run]
    # process 0 decides for all (its view of the shared workdir): a point it found complete is reused
    outcomes = {name: done[name] or ("reused", None) for name in names}
    print(f"Sweep of {len(points)} points into {sweep_dir}: {len(points) - len(pending)} already complete.")

    def run_one(item):
        name, cfg = item
        run = run_point if parallel_points == 1 else _run_point_in_subprocess
        outcome = run(cfg, sweep_dir / name)
        print(f"[sweep] {name}: {outcome[0]}" + (f" ({outcome[1]})" if outcome[1] else ""), flush=True)
        return name, outcome

    if parallel_points == 1:
        outcomes.update(map(run_one, pending))
    else:
        with ThreadPoolExecutor(max_workers=parallel_points) as pool:
            outcomes.update(pool.map(run_one, pending))
    return aggregate(points, sweep_dir, outcomes, dict(config.get(SELECTION, {})))


def select_points(rows: list[dict[str, Any]], selection: dict[str, str]) -> dict[str, dict[str, Any] | None]:
    """For each ``label: metric`` of ``selection``, the complete point with the lowest value of the headline
    ``metric`` (e.g. a validation loss): ``{"metric", "point", "value"}``, or None if no point has a finite one."""
    chosen: dict[str, dict[str, Any] | None] = {}
    for label, metric in selection.items():
        candidates = [(row["metrics"][metric], row["name"]) for row in rows if row["status"] != "failed"
                      and isinstance(row["metrics"].get(metric), (int, float)) and np.isfinite(row["metrics"][metric])]
        chosen[label] = None
        if candidates:
            value, name = min(candidates)
            chosen[label] = {"metric": metric, "point": name, "value": value}
    return chosen


def aggregate(
    points: list[Point], sweep_dir: Path, outcomes: dict[str, tuple[str, str | None]],
    selection: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Writes ``sweep.json`` (``{"rows": [...], "selected": {...}}``) and ``sweep.md``; a row is ``{"name",
    "status", "params", "metrics", "error"}`` with the metrics read from the point's done.json; ``selected``:
    :func:`select_points` for the config's ``sweep_selection`` (``{label: headline metric to minimise}``)."""
    rows = []
    for point, name in zip(points, point_names(points)):
        status, error = outcomes[name]
        metrics = runner.read_done(sweep_dir / name) if status != "failed" else None
        rows.append({"name": name, "status": status, "params": point, "metrics": metrics or {}, "error": error})
    selected = select_points(rows, selection or {})
    if parallel.is_main_process():
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage.write_json(sweep_dir / layout.SWEEP_FILE, {"rows": rows, "selected": selected})
        storage.write_text(sweep_dir / layout.SWEEP_MARKDOWN, points_markdown(rows) + selection_markdown(selected))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


def points_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per point: name, status, hyperparameters, headline metrics; failures listed below."""
    params = list(dict.fromkeys(key for row in rows for key in row["params"]))
    metrics = list(dict.fromkeys(key for row in rows for key in row["metrics"]))
    lines = [f"# Sweep: {len(rows)} points, {sum(row['status'] != 'failed' for row in rows)} complete", "",
             markdown_table(["point", "status", *params, *metrics],
                            ([row["name"], row["status"], *(_cell(row["params"].get(key)) for key in params),
                              *(_cell(row["metrics"].get(key)) for key in metrics)] for row in rows))]
    failures = [row for row in rows if row["status"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- `{row['name']}`: {row['error']} (see {row['name']}/{layout.ERROR_FILE})" for row in failures]
    return "\n".join(lines) + "\n"


def selection_markdown(selected: dict[str, dict[str, Any] | None]) -> str:
    """The ``## Chosen points`` section of sweep.md (empty without a selection)."""
    if not selected:
        return ""
    return "\n".join(["", "## Chosen points (lowest value of the metric; never chosen by test accuracy)", "",
                      markdown_table(["for", "metric", "point", "value"],
                                     ([label, "—", "no complete point", "—"] if choice is None else
                                      [label, choice["metric"], choice["point"], _cell(choice["value"])]
                                      for label, choice in selected.items()))]) + "\n"


def _run_pickled_point() -> int:
    """Subprocess entry of a parallel sweep: runs the (config, point_dir) pickled on stdin."""
    config, point_dir = pickle.load(sys.stdin.buffer)
    status, _ = run_point(config, Path(point_dir))
    return 0 if status == "done" else 1


if __name__ == "__main__":
    sys.exit(_run_pickled_point())
