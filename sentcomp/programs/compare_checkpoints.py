"""Downstream accuracy against cross-entropy across a checkpoint series: one table and two figures.

The last stage of ``experiments/checkpoints.py`` (a composed config); its config is just the runs to read, paired
by position::

    program = "sentcomp.programs.compare_checkpoints"
    labels = ("step1000", "step143000")                          # the checkpoints' names
    loss_runs = ("stage:loss_step1000", "stage:loss_step143000")  # sentcomp.programs.lm_loss runs
    table1_runs = ("stage:table1_step1000", "stage:table1_step143000")

It reads only those runs' ``results.json`` and writes ``results.json`` / ``results.md`` (a row per checkpoint:
model, revision, step, parameters, validation cross-entropy and perplexity, then the test accuracy of every
Table-1 cell ``task[*]/feature``), ``accuracy_vs_val_xent.png`` and ``accuracy_vs_step.png`` (a panel per
Table-1 cell, a line per model size, so a series of several sizes shows each size's curve; the step figure only
when some checkpoint's step is known). The headline: ``<label>/val_xent``, ``<label>/val_perplexity``,
``<label>/<row>/<column>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sentcomp import parallel
from sentcomp.errors import SentcompError
from sentcomp.results import layout, plots, storage
from sentcomp.results.tables import markdown_table

FIGURES = {"val_xent": "accuracy_vs_val_xent.png", "step": "accuracy_vs_step.png"}
AXIS_TITLES = {"val_xent": "validation cross-entropy (nats/token)", "step": "training step"}


def read_results(directory: Path, what: str) -> dict[str, Any]:
    """``directory/results.json``, or a SentcompError naming the unfinished run."""
    path = Path(directory) / layout.RESULTS_FILE
    if not path.is_file():
        raise SentcompError(f"{path} does not exist: the {what} run in {directory} has not finished. Run it first "
                            "(in a composed config: an earlier stage).")
    return json.loads(path.read_text())


def size_label(parameters: int) -> str:
    """A parameter count for a legend: ``70426624`` -> ``"70.4M params"``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if parameters >= scale:
            return f"{parameters / scale:.3g}{suffix} params"
    return f"{parameters} params"


def checkpoint_record(loss_dir: Path, table1_dir: Path) -> dict[str, Any]:
    """What the comparison needs from one checkpoint's loss and Table-1 runs."""
    loss, table1 = read_results(loss_dir, "loss"), read_results(table1_dir, "Table-1")
    accuracy = {f"{row}/{column}": cell["mean"] for row, cells in table1["table"].items()
                for column, cell in cells.items()}
    return {**{key: loss[key] for key in ("model", "revision", "step", "parameters", "val_xent", "val_perplexity",
                                          "tokens")},
            "loss_dir": str(loss_dir), "table1_dir": str(table1_dir), "accuracy": accuracy}


def cells(records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every Table-1 cell (``row/column``) of any checkpoint, in first-seen order."""
    return list(dict.fromkeys(cell for record in records.values() for cell in record["accuracy"]))


def series_table(records: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown table: a row per checkpoint, its step, size and losses, then each cell's accuracy (%)."""
    names = cells(records)
    lines = [[label, "—" if r["step"] is None else r["step"], f"{r['parameters']:,}", f"{r['val_xent']:.4f}",
              f"{r['val_perplexity']:.2f}",
              *("—" if r["accuracy"].get(name) is None else f"{100 * r['accuracy'][name]:.1f}" for name in names)]
             for label, r in records.items()]
    return markdown_table(["checkpoint", "step", "parameters", "val xent", "val ppl", *names], lines)


def series_by_size(records: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The checkpoints grouped into one line per model size (one group, named after the model, when all share
    a size)."""
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for record in records.values():
        groups.setdefault(record["parameters"], []).append(record)
    if len(groups) == 1:
        only = next(iter(records.values()))
        return {f"{Path(only['model']).name} ({size_label(only['parameters'])})": next(iter(groups.values()))}
    return {size_label(size): group for size, group in sorted(groups.items())}


def accuracy_figure(records: Mapping[str, Mapping[str, Any]], x: str, path: Path) -> Path | None:
    """Test accuracy (%) against ``x`` (``val_xent`` or ``step``): a panel per Table-1 cell, a line per model
    size; None when no checkpoint has a value of ``x``."""
    if not any(plots.is_number(record[x]) for record in records.values()):
        return None
    names = cells(records)
    figure, axes = plots.panel_grid(len(names), width=4.2, height=3.2)
    for axis, name in zip(axes, names):
        for label, group in series_by_size(records).items():
            points = sorted((r[x], 100 * r["accuracy"][name]) for r in group
                            if plots.is_number(r[x]) and name in r["accuracy"])
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel(AXIS_TITLES[x], fontsize=8)
        axis.set_ylabel("test accuracy (%)", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return plots.save(figure, path, f"downstream accuracy vs {AXIS_TITLES[x]} across checkpoints")


def headline(records: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Flat scalars for done.json: each checkpoint's losses and every test accuracy."""
    out: dict[str, float] = {}
    for label, record in records.items():
        out.update({f"{label}/val_xent": record["val_xent"], f"{label}/val_perplexity": record["val_perplexity"]})
        out.update({f"{label}/{name}": value for name, value in record["accuracy"].items()})
    return out


def check_config(config) -> None:
    """One label, one loss run and one Table-1 run per checkpoint (checked before the workdir is claimed)."""
    runs: Sequence = (config.labels, config.loss_runs, config.table1_runs)
    if not config.labels or len({len(items) for items in runs}) != 1:
        raise SentcompError(f"config.labels, config.loss_runs and config.table1_runs must name the same checkpoints, "
                            f"in order; got {[len(items) for items in runs]} entries.")


def run(config, workdir) -> dict[str, float]:
    """Reads the runs of ``config.loss_runs`` / ``config.table1_runs`` (named by ``config.labels``); writes
    results.json, results.md and the figures; returns the headline."""
    check_config(config)
    workdir = Path(workdir)
    runs: Sequence = (config.labels, config.loss_runs, config.table1_runs)
    records = {label: checkpoint_record(Path(loss), Path(table1)) for label, loss, table1 in zip(*runs)}
    if parallel.is_main_process():
        figures = [name for x, name in FIGURES.items() if accuracy_figure(records, x, workdir / name)]
        storage.write_json(workdir / layout.RESULTS_FILE, {"checkpoints": records, "figures": figures})
        markdown = "\n\n".join([
            "# Downstream accuracy across checkpoints", series_table(records),
            "Test accuracy (%) of a linear probe (the Table-1 runs' protocol) on each checkpoint's features; "
            "`task*`: with the task's prompt. val xent: validation cross-entropy (nats/token) of the loss run's "
            "corpus, val ppl its exponential.",
            *(f"![{name}]({name})" for name in figures)]) + "\n"
        storage.write_text(workdir / layout.RESULTS_MARKDOWN, markdown)
        print(markdown)
    return headline(records)
