"""The distillation experiment's table: per student and checkpoint, ε, the bound and the Table-1 probes, with the
teacher's probes as the ceiling (experiments/teacher.py; docs/teacher.md).

``run(config, workdir)`` reads the runs the earlier stages wrote (``config.targets``: the teacher-targets run;
``config.students``: ``(name, distill run)`` pairs; ``config.table1_runs``: ``(name, step, table1 run)`` triples;
``config.teacher_table1``: the teacher's Table-1 run) and writes ``results.json``, ``results.md`` and
``bound_vs_epsilon.png`` (per student: the tightest bound, the plug-in loss and the probe's test loss against ε on
the task's contexts). Every number is read, none recomputed. Headline: ``<student>/val_loss`` (the objective's own
validation loss at the last step, for choosing learning rates), ``<student>/epsilon``, ``bound_holds``.

Coverage: the exact bound uses ε on the task's own contexts (γ = 1). ε on held-out pretraining text is reported
beside it, with ``ε_heldout / ε_task`` as the *effective coverage* (:func:`effective_coverage`, with an interval):
the γ for which the population-form bound ``τ + sqrt(2B²ε_heldout/γ)`` equals the exact one. It is a ratio of two
measurements, not an estimate of ``inf_s p_L(s)/p_T(s)``, which is not measurable on real text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentcomp.errors import SentcompError
from sentcomp.results import layout, plots, storage
from sentcomp.results.tables import markdown_table

FIGURE_FILE = "bound_vs_epsilon.png"


def read_json(path: Path, what: str):
    if not Path(path).exists():
        raise SentcompError(f"{path} is missing: the {what} stage has not finished (re-run the experiment).")
    return json.loads(Path(path).read_text())


def read_metric_rows(run: Path) -> list[dict]:
    return [row for row in storage.read_json_lines(Path(run) / layout.METRICS_FILE) if "epsilon" in row]


def probe_entries(table1_run: Path, rows: list[str], columns: list[str]) -> dict[str, dict]:
    """``{"<row>/<column>": {"accuracy", "loss"}}`` from a Table-1 run: mean test accuracy and mean test loss."""
    results = read_json(Path(table1_run) / layout.RESULTS_FILE, "Table-1")
    out = {}
    for row in rows:
        for column in columns:
            cells = [c for c in results["cells"] if c["row"] == row and c["column"] == column]
            if cells:
                losses = [c["test_loss"] for c in cells if c.get("test_loss") is not None]
                out[f"{row}/{column}"] = {"accuracy": sum(c["test_accuracy"] for c in cells) / len(cells),
                                          "loss": sum(losses) / len(losses) if losses else None}
    return out


def checkpoint_entry(row: dict, probes: dict) -> dict:
    bound = row["bound"]
    return {"step": row["step"], "tokens": row["tokens"], "val_loss": row["val_loss"],
            "epsilon_heldout": row["epsilon"], "quad_excess_heldout": row["quad_excess"],
            "epsilon_task": bound["epsilon_task_ci"], "tightest": bound["tightest"], "bound_holds": bound["holds"],
            "max_violation": bound["max_violation"],
            "effective_coverage": effective_coverage(row["epsilon"], bound["epsilon_task_ci"]),
            "probes": probes}


def effective_coverage(heldout: dict, task: dict) -> dict | None:
    """``γ_eff = ε_heldout / ε_task`` with an interval from the two 95% intervals (``[low_h / high_t, high_h /
    low_t]``, conservative: the ratio of two interval estimates): the population-form bound ``τ + sqrt(2B²ε_heldout
    /γ)`` is at least the exact one (γ = 1, ε_task) for every γ ≤ γ_eff, so a claimed coverage above γ_eff's
    interval would contradict the measurements. None when ε_task is not positive."""
    if task["mean"] <= 0:
        return None
    low = heldout["low"] / task["high"] if task["high"] > 0 else None
    high = heldout["high"] / task["low"] if task["low"] > 0 else None
    return {"mean": heldout["mean"] / task["mean"], "low": low, "high": high}


def selected_students(students: dict[str, list[dict]]) -> dict[str, str]:
    """Per objective (students named ``student_<objective>_lr<i>``), the student whose last validation loss of its
    own objective is lowest: the learning-rate choice, made on validation loss only."""
    groups: dict[str, list[str]] = {}
    for name in students:
        groups.setdefault(name.rsplit("_lr", 1)[0], []).append(name)
    return {group: min(names, key=lambda n: students[n][-1]["val_loss"]) for group, names in groups.items()}


def _fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def results_markdown(results: dict) -> str:
    targets, columns = results["targets"], results["probe_columns"]
    lines = [f"# Distillation from {targets['teacher']} (k = {targets['k']}, mean truncation KL "
             f"{targets['truncation_kl']['mean']:.4f} nats)", "",
             "ε: mean KL(p_T ‖ p_f), 95% interval; bound: τ + sqrt(2B²ε_task) at the tightest frontier point "
             "(γ = 1 on the task's contexts: an exact inequality with the plug-in loss); probes: test accuracy.", "",
             "γ_eff = ε held-out / ε task [interval]: the population-form bound with the held-out ε holds for any "
             "coverage γ ≤ γ_eff."]
    chosen = set(results["selected"].values())
    rows = []
    for name, entries in results["students"].items():
        for e in entries:
            eps, tight = e["epsilon_heldout"], e["tightest"]
            probes = [_fmt(e["probes"].get(c, {}).get("accuracy")) for c in columns]
            label = f"{name} (selected)" if name in chosen else name
            gamma = e["effective_coverage"] or {}
            rows.append([label, str(e["step"]), f"{eps['mean']:.4f} [{eps['low']:.4f}, {eps['high']:.4f}]",
                         f"{e['quad_excess_heldout']['mean']:.4f}", f"{e['epsilon_task']['mean']:.4f}",
                         f"{_fmt(gamma.get('mean'), 2)} [{_fmt(gamma.get('low'), 2)}, {_fmt(gamma.get('high'), 2)}]",
                         f"{tight['tau']:.3f}", f"{tight['max_norm']:.3g}", f"{tight['bound']:.3f}",
                         f"{tight['plug_in']:.3f}", "yes" if e["bound_holds"] else "NO", *probes])
    teacher = [_fmt(results["teacher_probes"].get(c, {}).get("accuracy")) for c in columns]
    rows.append(["teacher (ceiling, ε = 0)", "", "0", "0", "0", "", "", "", "", "", "", *teacher])
    header = ["student", "step", "ε held-out", "excess Quad", "ε task", "γ_eff", "τ", "B", "bound", "plug-in", "holds",
              *columns]
    return "\n".join([*lines, "", markdown_table(header, rows)]) + "\n"


def check_config(config) -> None:
    """What needs no earlier stage's output (checked before the workdir is claimed): at least one student, and
    Table-1 runs named ``(student, step, run)``, each for a student of ``config.students``."""
    names = [name for name, _ in config.students]
    if not names:
        raise SentcompError("config.students is empty: name at least one (student, distillation run) pair.")
    unknown = sorted({entry[0] for entry in config.table1_runs} - set(names))
    if unknown or any(len(entry) != 3 for entry in config.table1_runs):
        raise SentcompError(f"config.table1_runs must hold (student, step, Table-1 run) triples of the students "
                            f"{names}; unknown students {unknown}.")


def run(config, workdir) -> dict:
    check_config(config)
    workdir = Path(workdir)
    targets = read_json(Path(config.targets) / layout.RESULTS_FILE, "teacher-targets")
    rows, columns = list(config.probe_rows), list(config.probe_columns)
    probes = {(name, int(step)): probe_entries(Path(path), rows, columns) for name, step, path in config.table1_runs}
    students = {}
    for name, run_dir in config.students:
        students[name] = [checkpoint_entry(row, probes.get((name, row["step"]), {}))
                          for row in read_metric_rows(Path(run_dir))]
        if not students[name]:
            raise SentcompError(f"{run_dir} has no evaluation rows: its distillation stage has not run.")
    results: dict[str, Any]
    results = {"targets": {key: targets[key] for key in ("teacher", "k", "truncation_kl", "truncation_kl_by_k",
                                                         "remaining_mass", "teacher_entropy", "train_positions",
                                                         "task_contexts")},
               "probe_columns": [f"{r}/{c}" for r in rows for c in columns],
               "teacher_probes": probe_entries(Path(config.teacher_table1), rows, columns),
               "students": students,
               "coverage": "γ = 1 on the task's contexts (exact); effective coverage γ_eff = ε_heldout / ε_task with "
                           "an interval from both 95% intervals: the population-form bound holds for any γ ≤ γ_eff",
               "bound_holds": all(e["bound_holds"] for entries in students.values() for e in entries),
               "selected": selected_students(students)}
    storage.write_json(workdir / layout.RESULTS_FILE, results)
    storage.write_text(workdir / layout.RESULTS_MARKDOWN, results_markdown(results))
    probe_column = results["probe_columns"][0] if results["probe_columns"] else None
    plots.bound_vs_epsilon({name: [{"epsilon": e["epsilon_task"]["mean"], "bound": e["tightest"]["bound"],
                                    "plug_in": e["tightest"]["plug_in"],
                                    "probe_loss": e["probes"].get(probe_column, {}).get("loss")} for e in entries]
                            for name, entries in students.items()}, workdir / FIGURE_FILE,
                           "the bound on real text, p* = the teacher")
    print(results_markdown(results))
    return {"bound_holds": results["bound_holds"],
            **{f"{name}/val_loss": entries[-1]["val_loss"] for name, entries in students.items()},
            **{f"{name}/epsilon": entries[-1]["epsilon_heldout"]["mean"] for name, entries in students.items()}}
