"""Table 1's cell log: every finished cell (task, row, column, split) in ``workdir/cells.jsonl``, keyed by
:func:`cell_key` and stamped with what determined its value (:func:`results_fingerprint`), so a re-run or a run
resumed after a kill recomputes nothing that is done and never returns another configuration's numbers."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sentcomp import parallel
from sentcomp.results import storage

# Config keys that choose which cells exist or how they are shown, not their values.
# The zero-shot variant settings are part of each variant cell's key (ZeroShotPlan.digest) instead; the zero-shot
# column's cell records its rule and is re-derived from its variant cell when config.zeroshot.rule changes.
NOT_DETERMINING = ("program", "tasks", "columns", "batch_size", "bert.enabled", "ft.enabled", "ft.progress",
                   "zeroshot.enabled", "zeroshot.shots", "zeroshot.sensitivity_shots", "zeroshot.templates",
                   "zeroshot.verbalizers", "zeroshot.balanced", "zeroshot.separator", "zeroshot.seed",
                   "zeroshot.rule", "prompt_probes.templates", "prompt_probes.shots", "resume_may_change",
                   "probe.p_f_memory_gb")
# The code behind a cell's value once features exist (features carry their own code fingerprint).
RESULT_CODE = ("sentcomp.probe", "sentcomp.zeroshot", "sentcomp.training.finetune", "sentcomp.kernels.logistic",
               "sentcomp.kernels.lbfgs", "sentcomp.kernels.ridge", "sentcomp.kernels.linear")


def cell_key(task: str, prompt: bool, column: str, repeat: int) -> str:
    """``task/column/split``, ``task*/...`` for the row with the task's prompt."""
    return f"{task}{'*' if prompt else ''}/{column}/{repeat}"


def results_fingerprint(config) -> str:
    """What decides every cell's value: the config but :data:`NOT_DETERMINING`, the model's files when
    ``config.model`` is a local path (a retrained model in the same place), and the probe/zero-shot code."""
    model = Path(config.model)
    return storage.content_hash(storage.settings_fingerprint(config.to_dict(), ignore=NOT_DETERMINING),
                                storage.path_fingerprint(model) if model.exists() else config.model,
                                storage.code_fingerprint(*RESULT_CODE))


def read_cells(path: Path) -> dict[str, dict]:
    """The cells of a ``cells.jsonl`` by key; a torn line (a kill mid-write) is skipped with a warning
    (:func:`sentcomp.results.storage.read_json_lines`), the cell recomputed."""
    return {cell["key"]: cell for cell in storage.read_json_lines(path)}


class CellLog:
    """Finished cells, one JSON object per line in ``workdir/cells.jsonl``, appended as each finishes.

    Every cell records ``determinants`` (:func:`results_fingerprint`); only the cells computed under the current
    ones count as done. Process 0 reads the file and sends its cells to the other processes (hosts never read
    it independently) and alone appends to it.
    """

    def __init__(self, path: Path, determinants: str):
        self.path = path
        self.determinants = determinants
        cells = parallel.main_decides(lambda: read_cells(path))
        self.cells = {key: cell for key, cell in cells.items() if cell.get("determinants") == determinants}
        if len(self.cells) < len(cells):
            warnings.warn(f"{path} holds {len(cells) - len(self.cells)} cells computed under another model, data, "
                          "protocol or code version; they are ignored and recomputed.", stacklevel=2)

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def add(self, cell: dict) -> None:
        cell = {**cell, "determinants": self.determinants}
        self.cells[cell["key"]] = cell
        if parallel.is_main_process():
            storage.append_json_line(self.path, cell)


def summarise(cells: Iterable[dict], metric: str = "test_accuracy") -> dict[str, dict[str, dict]]:
    """``{row: {column: {"mean", "std", "n_splits", "accuracies"}}}`` of ``metric`` (test accuracy, or e.g.
    ``"test_macro_f1"``) over each cell's splits; cells without the metric are left out."""
    grouped: dict[tuple[str, str], list[float]] = {}
    for cell in cells:
        if cell.get(metric) is not None:
            grouped.setdefault((cell["row"], cell["column"]), []).append(cell[metric])
    table: dict[str, dict[str, dict]] = {}
    for (row, column), accuracies in grouped.items():
        table.setdefault(row, {})[column] = {
            "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "n_splits": len(accuracies),
            "accuracies": accuracies,
        }
    return table
