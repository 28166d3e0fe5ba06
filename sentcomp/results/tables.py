"""Tables of results: records pivoted into cells with their intervals, and written as Markdown or CSV.

A **record** is one measurement, ``{row, column, metric, repeat, value, n, ...}`` (``n``: the test-set size of an
accuracy). :func:`pivot` groups records by any of their fields into a :class:`Table`; each cell is
:func:`aggregate` of its records: accuracies pool their test examples and get the 95% Wilson score interval
(:func:`sentcomp.results.statistics.wilson_interval`), other numbers their mean ± standard deviation.
:func:`markdown_table` is the one Markdown writer every program's ``results.md`` and the report use.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sentcomp.errors import SentcompError
from sentcomp.results import plots
from sentcomp.results.statistics import wilson_interval

ACCURACY = "test_accuracy"
CAPTION = ("Accuracies in %, with the 95% Wilson score interval [low, high] for n test examples (binomial; a cell "
           "that holds several splits or runs pools their test examples, so n is their total and the value their "
           "pooled accuracy). Other metrics: the value in the run's done.json; several runs in one cell give their "
           "mean ± standard deviation.")


class TableError(SentcompError):
    """Records that cannot form the table asked for (e.g. one cell would mix two metrics)."""


def table1_cells(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Records (without run fields) of a Table-1 ``results.json``-like dict: one per cell and split, in the
    table's order (rows ``task``, ``task*`` as listed, columns as listed), ``n`` = the cell's test-set size."""
    n_test = {task["name"]: task.get("n_test") for task in results.get("tasks", [])}
    rows = [row for name in n_test for row in (name, name + "*")]
    columns = list(results.get("columns", []))
    cells = [cell for cell in results.get("cells", []) if "column" in cell and ACCURACY in cell]

    def order(cell):
        return (rows.index(cell["row"]) if cell["row"] in rows else len(rows),
                columns.index(cell["column"]) if cell["column"] in columns else len(columns), cell.get("repeat", 0))

    return [{"row": cell["row"], "column": cell["column"], "metric": ACCURACY, "repeat": cell.get("repeat", 0),
             "value": cell[ACCURACY], "n": cell.get("n_test") or n_test.get(cell["row"].rstrip("*"))}
            for cell in sorted(cells, key=order)]


@dataclasses.dataclass


class Table:
    """A pivot: ``cells[(row key, column key)]`` = :func:`aggregate` of the records with those field values."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    row_keys: list[tuple]
    column_keys: list[tuple]
    cells: dict[tuple[tuple, tuple], dict[str, Any]]


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One table cell from its records: ``{metric, value, low, high, n, std, count}``.

    Accuracies with a test-set size ``n`` pool their test examples (successes = accuracy × n, rounded) and get
    the Wilson interval of the pooled proportion; other numbers give their mean (and std over several records);
    text values are kept when they agree, else joined with " / "."""
    metrics = sorted({str(record["metric"]) for record in records})
    values = [record["value"] for record in records]
    cell: dict[str, Any] = {"metric": metrics[0], "value": None, "low": None, "high": None, "n": None, "std": None,
                            "count": len(records)}
    if not all(plots.is_number(value) for value in values):
        cell["value"] = " / ".join(dict.fromkeys(str(value) for value in values))
        return cell
    if len(values) > 1:
        cell["std"] = statistics.pstdev(values)
    sizes = [size for record in records if isinstance(size := record.get("n"), int) and size > 0]
    if len(sizes) == len(records):
        successes = sum(round(value * size) for value, size in zip(values, sizes))
        cell.update(n=sum(sizes), value=successes / sum(sizes))
        cell["low"], cell["high"] = wilson_interval(successes, cell["n"])
    else:
        cell["value"] = statistics.fmean(values)
    return cell


def pivot(records: Sequence[dict[str, Any]], rows: Sequence[str], columns: Sequence[str]) -> Table:
    """Records pivoted by the ``rows`` and ``columns`` fields (first-seen order); a cell may not mix metrics."""
    groups: dict[tuple[tuple, tuple], list[dict[str, Any]]] = {}
    for record in records:
        key = (tuple(record.get(field, "") for field in rows), tuple(record.get(field, "") for field in columns))
        groups.setdefault(key, []).append(record)
    for (row_key, column_key), members in groups.items():
        metrics = sorted({str(record["metric"]) for record in members})
        if len(metrics) > 1:
            raise TableError(f"the cell {label(row_key)} × {label(column_key)} would mix the metrics {metrics}: "
                              "add metric to --rows or --columns, or pick one with --metric.")
    return Table(tuple(rows), tuple(columns), list(dict.fromkeys(key[0] for key in groups)),
                 list(dict.fromkeys(key[1] for key in groups)),
                 {key: aggregate(members) for key, members in groups.items()})


def label(key: tuple) -> str:
    """A row or column key as text: its non-empty values joined by " / " ("value" when there are none)."""
    return " / ".join(str(part) for part in key if part != "") or "value"


def format_cell(cell: dict[str, Any] | None) -> str:
    """``58.3 [38.8, 75.5]`` (an accuracy in % with its interval), ``2.704`` or ``2.7 ± 0.05``, ``—`` if empty."""
    if cell is None:
        return "—"
    value = cell["value"]
    if cell["low"] is not None:
        return f"{100 * value:.1f} [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"
    if not plots.is_number(value):
        return str(value)
    return f"{value:.4g}" + (f" ± {cell['std']:.2g}" if cell["std"] is not None else "")


def markdown_table(header: Sequence[Any], lines: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (``|`` inside a cell escaped); shared with Table-1's results.md."""
    escaped = [[str(value).replace("|", "\\|") for value in line] for line in lines]
    return "\n".join(["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(line) + " |" for line in escaped)])


def table_markdown(table: Table) -> str:
    columns = [label(key) for key in table.column_keys]
    return markdown_table([*table.rows, *columns],
                          ([*row_key, *(format_cell(table.cells.get((row_key, key))) for key in table.column_keys)]
                           for row_key in table.row_keys))


def table_csv(table: Table) -> str:
    """The pivot as CSV: the row fields, then per column its value (accuracies as fractions) and, when any of
    its cells has an interval, ``<column> low`` and ``<column> high``."""
    header, getters = list(table.rows), []
    for key in table.column_keys:
        with_interval = any(table.cells.get((row, key), {}).get("low") is not None for row in table.row_keys)
        for part in ("value", "low", "high") if with_interval else ("value",):
            header.append(label(key) + ("" if part == "value" else f" {part}"))
            getters.append((key, part))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row_key in table.row_keys:
        writer.writerow([*row_key, *("" if (cell := table.cells.get((row_key, key))) is None or cell[part] is None
                                     else cell[part] for key, part in getters)])
    return out.getvalue()


def table_json(table: Table) -> dict[str, Any]:
    return {"rows": list(table.rows), "columns": list(table.columns), "caption": CAPTION,
            "table": [{**dict(zip(table.rows, row_key)),
                       "cells": {label(key): table.cells[(row_key, key)] for key in table.column_keys
                                 if (row_key, key) in table.cells}} for row_key in table.row_keys]}


def accuracy_groups(records: Sequence[dict[str, Any]],
                    group_by: Sequence[str]) -> dict[str, dict[str, plots.AccuracyBar]]:
    """``{group: {column: (accuracy, low, high)}}`` for :func:`sentcomp.results.plots.accuracy_bars`, from the accuracy
    records with a test-set size, pooled like the table's cells."""
    table = pivot([r for r in records if r["metric"] == ACCURACY and r.get("n")], group_by, ("column",))
    return {label(row): {label(column): (cell["value"], cell["low"], cell["high"])
                         for column in table.column_keys if (cell := table.cells.get((row, column)))}
            for row in table.row_keys}


def table1_figure(results: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """A Table-1 run's table (``results.json``'s dict) as grouped bars with 95% Wilson intervals: what
    :mod:`sentcomp.programs.table1` writes as ``results.png``, drawn as
    :mod:`sentcomp.report` draws several runs."""
    return plots.accuracy_bars(accuracy_groups(table1_cells(results), ("row",)), path, title)
