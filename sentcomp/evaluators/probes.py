"""The probe columns: each feature column of the LM (:mod:`sentcomp.evaluators.columns`) on the rows ``task``
(the text alone) and ``task*`` (the text + the task's prompt), probed with
``sentcomp.probe.evaluate(protocol=config.probe.protocol)`` (the paper's: L2 logistic regression, C by 5-fold CV
on train) and scored by test accuracy. Features are extracted once per task and row, all kinds in one pass over
the model, for the unique texts of all splits, and cached under ``workdir/features``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sentcomp import probe
from sentcomp.data import Split
from sentcomp.data.text import WordSet
from sentcomp.errors import SentcompError
from sentcomp.evaluators.base import Evaluator, ModelLoader
from sentcomp.evaluators.cells import CellLog, cell_key
from sentcomp.evaluators.columns import FEATURE_COLUMNS, columns_for, row_features, row_request
from sentcomp.evaluators.task_data import TaskData
from sentcomp.evaluators.zeroshot import prompt_zeroshot_words
from sentcomp.features import RowRequest
from sentcomp.results import timings


def check_multinomial_cells(cells: Sequence[str]) -> None:
    """``probe.multinomial_cells`` entries are ``"task:column"`` with a known feature column."""
    bad = [c for c in cells if c.count(":") != 1 or c.split(":")[1] not in FEATURE_COLUMNS]
    if bad:
        raise SentcompError(f"config.probe.multinomial_cells entries must be 'task:column' with a column of "
                            f"{list(FEATURE_COLUMNS)}; got {bad}.")


def check_p_f_unscaled(config) -> None:
    """The ``p_f`` column is probed through its row-space coordinates (:func:`sentcomp.probe.row_space_features`),
    exact only for unscaled features: ``probe.standardize=True`` would silently probe something else."""
    if "p_f" in config.columns and config.probe.standardize:
        raise SentcompError(
            "config.probe.standardize=True cannot be used with the p_f column: p_f is probed exactly through its "
            "N × N kernel matrix, which holds only for unscaled features (standardising its V columns is not a "
            "transform of the row-space coordinates). Set probe.standardize=False, or drop p_f from "
            "config.columns (projected_p_f can be standardised)."
        )


def cell_multi_class(probe_config, task_name: str, column: str) -> str:
    """``probe.multi_class``, except multinomial for the ``task:column`` cells listed in
    ``probe.multinomial_cells`` (the authors' exception: SST-5's probes on every feature but f(s)), and
    everywhere under ``protocol="mteb"`` (MTEB's probe is sklearn's multinomial ``LogisticRegression``)."""
    if probe_config.protocol == "mteb" or f"{task_name}:{column}" in probe_config.multinomial_cells:
        return "multinomial"
    return probe_config.multi_class


def probe_cell(x: np.ndarray, pair_rows: tuple[np.ndarray, np.ndarray], pair: tuple[Split, Split],
               probe_config, multi_class: str) -> dict[str, Any]:
    """Test accuracy (and how it was chosen) of one probe; only JSON-ready numbers are kept."""
    (train_rows, test_rows), (train, test) = pair_rows, pair
    options = probe.ProbeOptions.from_config(probe_config, multi_class=multi_class)
    result = probe.evaluate(x[train_rows], train.labels, x[test_rows], test.labels, options=options).to_json()
    keep = ("test_accuracy", "test_macro_f1", "test_loss", "train_accuracy", "regularisation", "regularisation_name",
            "grid", "converged", "iterations", "multi_class", "cv_fits", "cv_not_converged", "cv_mean")
    return {**{k: result[k] for k in keep}, "n_features": int(x.shape[1])}


def row_name(data: TaskData, with_prompt: bool) -> str:
    return data.task.name + "*" * with_prompt


def missing(data: TaskData, with_prompt: bool, columns: Sequence[str], log: CellLog) -> list[tuple[str, int]]:
    """The ``(column, split)`` cells of a row not yet in ``log``."""
    return [(c, r) for c in columns for r in range(len(data.pairs))
            if cell_key(data.task.name, with_prompt, c, r) not in log]


def probe_cells(features: dict[str, np.ndarray], todo: Sequence[tuple[str, int]], data: TaskData, with_prompt: bool,
                word_sets: dict[str, WordSet], probe_config) -> Iterator[dict]:
    """The cell of each ``(column, split)`` of ``todo``: a probe on ``features[column]`` (any column's: the LM's
    or another model's, e.g. BERT's), with the words behind a word column."""
    row = row_name(data, with_prompt)
    for column, repeat in tqdm(todo, desc=f"probes {row}"):
        with timings.part(f"probes {row}"):
            cell = probe_cell(features[column], data.pair_rows[repeat], data.pairs[repeat], probe_config,
                              cell_multi_class(probe_config, data.task.name, column))
        kind, group = FEATURE_COLUMNS.get(column, (column, None))
        yield {"key": cell_key(data.task.name, with_prompt, column, repeat), "row": row, "column": column,
               "repeat": repeat, "kind": kind, "words": list(word_sets[group].forms) if group else None, **cell}


def metadata_key(data: TaskData) -> str:
    return f"{data.task.name}/metadata"


def task_metadata(data: TaskData, log: CellLog) -> dict:
    """The task description's word sets (kept and dropped words), truncated texts and tokens with the prompt."""
    meta = log.cells[metadata_key(data)]
    return {"word_sets": {group: {k: meta["word_sets"][group][k] for k in ("forms", "dropped")}
                          for group in meta["word_sets"]},
            "n_truncated": meta["n_truncated"], "n_tokens_with_prompt": meta["n_tokens"]}


class ProbeColumns(Evaluator):
    """``config.columns`` on both rows, and each task's metadata cell (word sets, truncation, token counts: from
    the prompt row's extraction, which also holds the zero-shot words' log-probabilities when zero-shot is on)."""

    def columns(self) -> list[str]:
        return list(self.config.columns)

    def check(self, datas: Sequence[TaskData]) -> None:
        """Refuses up front (before any model pass) a ``p_f`` column whose ``N × N`` kernel and eigendecomposition
        (:func:`sentcomp.probe.row_space_peak_bytes`) do not fit in ``config.probe.p_f_memory_gb`` (0: the memory
        available now)."""
        if "p_f" not in self.config.columns:
            return
        limit = self.config.probe.p_f_memory_gb * 1e9 if self.config.probe.p_f_memory_gb > 0 else None
        for data in datas:
            probe.check_row_space_fits(len(data.texts), limit_bytes=limit,
                                       what=f"p_f column of task {data.task.name!r}")

    def row_todo(self, data: TaskData, log: CellLog, with_prompt: bool) -> tuple[list[tuple[str, int]], bool]:
        """A row's missing ``(column, split)`` cells, and whether the task's metadata cell (made from the prompt
        row's extraction) is missing."""
        todo = missing(data, with_prompt, columns_for(data.task, self.config.columns), log)
        return todo, with_prompt and metadata_key(data) not in log

    def extractions(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> list[RowRequest]:
        """The extraction of each row with a missing cell (:func:`~sentcomp.evaluators.columns.row_request`)."""
        requests = []
        for with_prompt in (False, True):
            if any(self.row_todo(data, log, with_prompt)):
                extra_words = prompt_zeroshot_words(data.task, self.config) if with_prompt else ()
                requests.append(row_request(load_model(), data.task, columns_for(data.task, self.config.columns),
                                            data.task.prompt if with_prompt else None, extra_words)[0])
        return requests

    def cells(self, data: TaskData, log: CellLog, load_model: ModelLoader) -> Iterator[dict]:
        config, task = self.config, data.task
        columns = columns_for(task, config.columns)
        for with_prompt in (False, True):
            todo, needs_metadata = self.row_todo(data, log, with_prompt)
            if not (todo or needs_metadata):
                continue
            extra_words = prompt_zeroshot_words(task, config) if with_prompt else ()
            lm = load_model()
            with timings.part(f"features {row_name(data, with_prompt)}"):
                features, word_sets, extracted = row_features(lm, task, data.texts, columns,
                                                              task.prompt if with_prompt else None, config,
                                                              self.workdir, extra_words)
            if extra_words:
                data.prompt_extraction = extracted
            if needs_metadata:
                yield {"key": metadata_key(data), "word_sets": {g: ws.to_json() for g, ws in word_sets.items()},
                       "n_truncated": extracted["metadata"]["n_truncated"],
                       "n_tokens": extracted["metadata"]["n_tokens"]}
            yield from probe_cells(features, todo, data, with_prompt, word_sets, config.probe)
