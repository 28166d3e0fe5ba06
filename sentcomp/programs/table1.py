"""The paper's Table 1: linear probes on LM features of downstream tasks, with and without the prompt.

For each task, every column family of :mod:`sentcomp.evaluators` that ``config`` enables fills its cells: the
linear probes on the LM's feature columns (``config.columns``, :mod:`sentcomp.evaluators.columns`) on the rows
``task`` (the text alone) and ``task*`` (the text + the task's prompt, e.g. ``" This movie is"``), scored by test
accuracy (:mod:`~sentcomp.evaluators.probes`); the BERT and fine-tuning baselines (``config.bert`` / ``config.ft``,
off by default); the prompt row's probes under other templates and a k-shot prefix (``config.prompt_probes``, off
by default); and zero-/few-shot sentence completion (``config.zeroshot``: the table's ``zeroshot`` column on the
``task*`` row, the scoring-rule and prompt-sensitivity tables).

Each text is read once per task: the extractions every family's missing cells read (the rows with and without the
prompt, each zero-shot template's k = 0 row) are declared first (:meth:`Evaluator.extractions`) and computed in
one pass (:func:`sentcomp.features.extract_rows`: with a key/value cache, every prompt's row continues its text's
cached states), then the families read them from the feature cache.

Tasks with an official split use it; the others (MPQA, CR) are pooled and evaluated on
``config.n_repeats`` seeded 90/10 splits, reported as mean ± std. ``config.n_train``/``config.n_test`` (> 0)
take a seeded stratified subset of train/test (for pooled tasks: ``n_train + n_test`` pooled examples).

Every finished cell (task, row, column, split) is appended to ``workdir/cells.jsonl`` at once
(:class:`~sentcomp.evaluators.cells.CellLog`), so a re-run (or a run resumed after a kill) recomputes nothing that
is done, and needs no model forward pass at all when every cell is done. Each cell records what determined it
(:func:`~sentcomp.evaluators.cells.results_fingerprint`: model, data, protocol, code); a run under other
determinants ignores it (with a warning) and recomputes, so it never returns another configuration's numbers.

Writes ``workdir/results.json`` (every cell with its configuration, the table, data sizes, word sets),
``workdir/results.md`` (:func:`sentcomp.results.table1_markdown.results_markdown`: the table laid out like the
paper's Table 1, every accuracy with its 95% Wilson interval, the probes' macro-F1, then data sizes, words, and
the chosen regularisation of each probe) and ``workdir/results.png`` (the table as grouped bars with 95% Wilson
intervals, drawn as ``python -m sentcomp.report`` draws several runs: :func:`sentcomp.results.tables.table1_figure`),
and prints the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sentcomp import models, parallel, probe
from sentcomp.data import get_task
from sentcomp.errors import SentcompError
from sentcomp.evaluators.base import Evaluator
from sentcomp.evaluators.bert import BertColumn
from sentcomp.evaluators.cells import CellLog, results_fingerprint, summarise
from sentcomp.evaluators.columns import EXTRACTION_SETTINGS, check_columns, extraction_options
from sentcomp.evaluators.finetune import FineTuneColumn
from sentcomp.evaluators.probes import ProbeColumns, check_multinomial_cells, check_p_f_unscaled, task_metadata
from sentcomp.evaluators.prompt_probes import PromptProbes
from sentcomp.evaluators.task_data import TaskData, prepare_task
from sentcomp.evaluators.zeroshot import ZeroShotColumn, check_zeroshot_config
from sentcomp.features import extract_rows
from sentcomp.results import layout, storage, tables, timings
from sentcomp.results.table1_markdown import results_markdown

# The column families, in the order of the table's columns (and of their work within each task).
EVALUATORS = (ProbeColumns, BertColumn, FineTuneColumn, PromptProbes, ZeroShotColumn)


def enabled_evaluators(config, workdir: Path) -> list[Evaluator]:
    return [family(config, workdir) for family in EVALUATORS if family.enabled(config)]


def table_columns(config) -> list[str]:
    """The table's columns: every enabled family's, in :data:`EVALUATORS` order."""
    return [column for evaluator in enabled_evaluators(config, Path()) for column in evaluator.columns()]


def check_config(config) -> None:
    """What can be checked before any work (the launcher calls this before it claims the workdir): the tasks
    exist, ``data_dir`` is a directory, the model loads offline (:func:`sentcomp.models.hf.check_source`), the
    sizes are ≥ 1, the feature columns and multinomial cells are known, and the zero-shot settings are usable
    (:func:`~sentcomp.evaluators.zeroshot.check_zeroshot_config`)."""
    if not config.tasks:
        raise SentcompError("config.tasks is empty: name at least one task, e.g. --config.tasks=\"('sst2',)\".")
    for name in config.tasks:
        get_task(name)
    if config.data_dir and not Path(config.data_dir).expanduser().is_dir():
        raise SentcompError(f"config.data_dir={config.data_dir!r} is not a directory: pass the folder holding the "
                            "task files (docs/tasks.md), or \"\" for built-in data and TFDS's default.")
    sizes = {"max_length": config.max_length, "batch_size": config.batch_size}
    if config.ft.enabled:
        sizes.update({f"ft.{key}": config.ft[key] for key in ("batch_size", "eval_batch_size", "eval_every")})
    for key, value in sizes.items():
        if value < 1:
            raise SentcompError(f"config.{key} must be ≥ 1, got {value}.")
    check_columns(config.columns)
    check_multinomial_cells(config.probe.multinomial_cells)
    check_p_f_unscaled(config)
    pc = config.probe
    probe.check_settings(pc.protocol, pc.multi_class, n_folds=pc.n_folds, max_iter=pc.max_iter,
                         n_experiments=pc.n_experiments, samples_per_label=pc.samples_per_label)
    check_zeroshot_config(config)
    models.hf.check_source(config.model, config.revision, known=(models.RANDOM_GPT2, *models.ALIASES))
    if config.bert.enabled:
        models.hf.check_source(config.bert.model, known=tuple(models.ALIASES))


def task_description(data: TaskData, evaluators: Sequence[Evaluator], log: CellLog) -> dict:
    """The task's entry in results.json: its name, prompt, sizes and label words, each family's entries, then its
    word sets, truncated texts and tokens (from the metadata cell of the prompt row's extraction)."""
    task = data.task
    description = {
        "name": task.name, "prompt": task.prompt, "n_splits": len(data.pairs),
        "n_train": len(data.pairs[0][0]), "n_test": len(data.pairs[0][1]),
        "label_words": {label: list(words) for label, words in task.label_words.items()},
    }
    for evaluator in evaluators:
        description.update(evaluator.describe(data))
    return {**description, **task_metadata(data, log)}


def read_texts_once(data: TaskData, evaluators: Sequence[Evaluator], log: CellLog, load_model, config,
                    workdir: Path) -> None:
    """Every extraction the families' missing cells will read (:meth:`Evaluator.extractions`: the rows with and
    without the prompt, the zero-shot templates), computed in one pass over the task's texts
    (:func:`sentcomp.features.extract_rows`) and cached, so that each family's cells find them there."""
    requests = [request for evaluator in evaluators for request in evaluator.extractions(data, log, load_model)]
    if len(requests) > 1:
        with timings.part(f"features {data.task.name} ({len(requests)} rows, one pass)"):
            extract_rows(load_model(), data.texts, requests, extraction_options(config, workdir))


def run(config, workdir) -> dict:
    """Runs (or resumes) every task of ``config.tasks``; writes results.json/.md; returns the headline
    accuracies ``{"<row>/<column>": mean test accuracy}``."""
    workdir = Path(workdir)
    check_config(config)
    datas = [prepare_task(name, config) for name in config.tasks]
    evaluators = enabled_evaluators(config, workdir)
    for evaluator in evaluators:
        evaluator.check(datas)
    log = CellLog(workdir / layout.CELLS_FILE, results_fingerprint(config))
    lm_cache: list = []

    def load_model():  # the model is loaded only if some cell needs it
        if not lm_cache:
            with timings.part("load"):
                lm_cache.append(models.from_config(config))
        return lm_cache[0]

    with timings.recording() as record:  # the cost of each part of this run (resumed parts: not run, not timed)
        for data in datas:
            read_texts_once(data, evaluators, log, load_model, config, workdir)
            for evaluator in evaluators:
                for cell in evaluator.cells(data, log, load_model):
                    log.add(cell)
    row_names = {name for data in datas for name in (data.task.name, data.task.name + "*")}
    cells = [c for c in log.cells.values() if "column" in c and c["row"] in row_names]
    table = summarise(cells)
    present = [c for c in table_columns(config) if any(c in row for row in table.values())]
    results = {
        "model": config.model, "probe": config.probe.to_dict(), "columns": present,
        "tasks": [task_description(data, evaluators, log) for data in datas],
        "table": table, "macro_f1": summarise(cells, "test_macro_f1"), "cells": sorted(cells, key=lambda c: c["key"]),
        "extraction": {key: config[key] for key in EXTRACTION_SETTINGS},
        "timings": record.to_json(matmul_rate=True),
    }
    for evaluator in evaluators:
        results.update(evaluator.results(datas, log, table))
    markdown = results_markdown(results)
    if parallel.is_main_process():
        storage.write_json(workdir / layout.RESULTS_FILE, results)
        storage.write_text(workdir / layout.RESULTS_MARKDOWN, markdown)
        tables.table1_figure(results, workdir / layout.RESULTS_FIGURE,
                             f"Table 1: linear probes on {config.model} features")
    print(markdown)
    return {f"{row}/{column}": entry["mean"] for row, entries in table.items() for column, entry in entries.items()}
