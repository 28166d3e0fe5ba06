"""The paper's Table 1: linear probes on LM features of downstream tasks, with and without the prompt.

For each task, and each of the two rows ``task`` (the text alone) and ``task*`` (the text + the task's prompt,
e.g. ``" This movie is"``), every feature column (notation of ../shared/PAPER.md, ``h = f(s)``):

==================  =====================================================================================
column              features
==================  =====================================================================================
``f``               ``f(s)``, the LM's features at the last token (``[d]``)
``phi_p_f``         ``Φ p_f(s)``, the conditional-mean features (``[d]``)
``subset_logits``   ``hᵀφ_w`` for the task's subset words (the authors' word-subset features)
``subset_log_probs`` ``log p_f(s)(w)`` for the same words
``subset_probs``    ``p_f(s)(w)`` for the same words (the theory's classifiers are linear in probabilities)
``class_logits``    ``hᵀφ_w`` for the class words (``:)``, ``:(`` for sentiment)
``posneg_logits``   ``hᵀφ_w`` for ``positive``/``negative`` (sentiment tasks only)
``p_f``             the full next-word distribution ``p_f(s)`` (``[V]``; off by default: it is written to disk,
                    ``N × V`` floats, and probed exactly through its ``N × N`` kernel matrix)
``projected_p_f``   ``A p_f(s)`` for a seeded random orthonormal ``d × V`` matrix ``A`` (off by default;
                    streamed over V, ``config.projection_seed``)
==================  =====================================================================================

is probed with ``sentcomp.probe.evaluate(protocol=config.probe.protocol)`` (the paper's: L2 logistic
regression, C by 5-fold CV on train) and scored by test accuracy. The ``task*`` row also gets a ``zeroshot``
column: sentence completion with the task's label words (:mod:`sentcomp.zeroshot`), no training at all.
Word columns use every single-token form ``" w"``/``"w"`` of their words (``sentcomp.data.text.word_set``);
the words kept and dropped are reported.

Tasks with an official split use it; the others (MPQA, CR) are pooled and evaluated on
``config.n_repeats`` seeded 90/10 splits, reported as mean ± std. ``config.n_train``/``config.n_test`` (> 0)
take a seeded stratified subset of train/test (for pooled tasks: ``n_train + n_test`` pooled examples).

Features are extracted once per task and row, all kinds in one pass over the model (the word kinds over the
union of all word sets, whose columns are then selected per set), for the unique texts of all splits, and
cached under ``workdir/features`` (:func:`sentcomp.features.extract_features`). Every finished cell (task,
row, column, split) is appended to ``workdir/cells.jsonl`` at once, so a re-run (or a run resumed after a
kill) recomputes nothing that is done, and needs no model forward pass at all when every cell is done. Each
cell records what determined it (:func:`results_fingerprint`: model, data, protocol, code); a run under other
determinants ignores it (with a warning) and recomputes, so it never returns another configuration's numbers.

Writes ``workdir/results.json`` (every cell with its configuration, the table, data sizes, word sets),
``workdir/results.md`` (the table laid out like the paper's Table 1, every accuracy with its 95% Wilson interval,
the probes' macro-F1, then data sizes, words, and the chosen regularisation of each probe) and
``workdir/results.png`` (the table as grouped bars with 95% Wilson intervals, drawn as ``python -m
sentcomp.report`` draws several runs: :func:`sentcomp.results.tables.table1_figure`), and prints the table.

BERT and fine-tuning columns (the paper's baselines) plug in at :func:`baseline_features` and
:func:`finetune_cells` (``config.bert`` / ``config.ft``, off by default).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sentcomp import models, parallel, probe, zeroshot
from sentcomp.data import Split, evaluation_splits, get_task, load_task, stratified_split
from sentcomp.data.tasks import Task
from sentcomp.data.text import WordSet, demonstration_prefix, encode_texts, sample_demonstrations, word_set
from sentcomp.errors import SentcompError
from sentcomp.features import extract_features
from sentcomp.results import storage, tables, timings
from sentcomp.results.statistics import wilson_interval
from sentcomp.results.tables import markdown_table

# column -> (kind extracted by sentcomp.features, word group or None)
FEATURE_COLUMNS = {
    "f": ("f", None),
    "phi_p_f": ("phi_p_f", None),
    "subset_logits": ("word_logits", "subset"),
    "subset_log_probs": ("word_log_probs", "subset"),
    "subset_probs": ("word_probs", "subset"),
    "class_logits": ("word_logits", "class"),
    "posneg_logits": ("word_logits", "posneg"),
    "p_f": ("p_f", None),
    "projected_p_f": ("projected_p_f", None),
}
ZEROSHOT = "zeroshot"
BERT = "bert"
FINETUNE = "finetune"
COLUMN_TITLES = {
    "f": "f(s)",
    "phi_p_f": "Φp_f(s)",
    "subset_logits": "subset logits",
    "subset_log_probs": "subset log-probs",
    "subset_probs": "subset probs",
    "class_logits": "class-word logits",
    "posneg_logits": "pos/neg logits",
    "p_f": "p_f(s)",
    "projected_p_f": "A p_f(s)",
    BERT: "BERT",
    FINETUNE: "fine-tune",
    ZEROSHOT: "zero-shot",
}
CELLS_FILE = "cells.jsonl"
FIGURE_FILE = "results.png"


# ---------------------------------------------------------------------------------------------------- data


def subsample(split: Split, n: int, seed: int) -> Split:
    """A seeded stratified subset of about ``n`` examples (each class keeps its share; original order kept);
    the whole split when ``n`` ≤ 0 or ``n`` ≥ its size."""
    if n <= 0 or n >= len(split):
        return split
    return stratified_split(split, n / len(split), seed)[1]


def task_pairs(task: Task, splits: dict[str, Split], n_train: int, n_test: int, n_repeats: int,
               seed: int) -> list[tuple[Split, Split]]:
    """The (train, test) pairs of ``task``: its official pair subsampled to ``n_train``/``n_test``, or, for tasks
    without an official split, ``n_repeats`` seeded 90/10 splits of ``n_train + n_test`` pooled examples."""
    if task.official_split:
        train, test = evaluation_splits(task, splits)[0]
        return [(subsample(train, n_train, seed), subsample(test, n_test, seed))]
    pooled = subsample(Split.concatenate(splits.values()), n_train + n_test if n_train > 0 and n_test > 0 else 0, seed)
    return evaluation_splits(task, {"pooled": pooled}, n_repeats=n_repeats, seed=seed)


def unique_texts(pairs: Sequence[tuple[Split, Split]]) -> list[str]:
    """Every text of every split once, in first-seen order (features depend on the text only)."""
    return list(dict.fromkeys(text for pair in pairs for split in pair for text in split.texts))


def rows_of(texts: Sequence[str], pool: dict[str, int]) -> np.ndarray:
    return np.fromiter((pool[text] for text in texts), np.int64, len(texts))


# --------------------------------------------------------------------------------------------------- words


def word_groups(task: Task) -> dict[str, tuple[str, ...]]:
    """The task's non-empty word sets: ``subset``, ``class``, ``posneg`` (sentiment only)."""
    groups = {"subset": task.subset_words, "class": task.class_words, "posneg": task.posneg_words}
    return {name: tuple(words) for name, words in groups.items() if words}


def union_words(groups: dict[str, Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(word for words in groups.values() for word in words))


def extraction_words(task: Task, extra_words: Sequence[str] = ()) -> list[str]:
    """The words one extraction of a row resolves: its word groups' union, then ``extra_words`` (the prompt
    row's zero-shot words, :func:`prompt_zeroshot_words`), each once."""
    return list(dict.fromkeys([*union_words(word_groups(task)), *extra_words]))


def word_columns(union: WordSet, group: WordSet) -> np.ndarray:
    """Positions, among the union's token ids, of a group's token ids (one extraction serves every group)."""
    return np.array([union.token_ids.index(token) for token in group.token_ids], np.int64)


def columns_for(task: Task, wanted: Sequence[str]) -> list[str]:
    """The feature columns of ``wanted`` that apply to ``task`` (word columns need a non-empty word set)."""
    unknown = [c for c in wanted if c not in FEATURE_COLUMNS]
    if unknown:
        raise SentcompError(f"Unknown feature columns {unknown}; choose from {list(FEATURE_COLUMNS)}.")
    groups = word_groups(task)
    return [c for c in wanted if FEATURE_COLUMNS[c][1] is None or FEATURE_COLUMNS[c][1] in groups]


def check_word_columns(columns: Sequence[str], word_sets: dict[str, WordSet], model: str) -> None:
    """A word column needs some of its words to be single tokens of the model's tokenizer (none are for a
    byte-level one): refused before the features are extracted, naming the columns to drop."""
    empty = [column for column in columns
             if FEATURE_COLUMNS[column][1] in word_sets and not word_sets[FEATURE_COLUMNS[column][1]].token_ids]
    if empty:
        kept = tuple(column for column in columns if column not in empty)
        raise SentcompError(f"The tokenizer of {model} makes none of the task's words for columns {empty} a single "
                            "token (a byte-level tokenizer has no word tokens), so these columns have no features: "
                            f"drop them, e.g. --config.columns=\"{kept}\".")


def column_features(extracted: dict[str, np.ndarray], column: str, word_sets: dict[str, WordSet],
                    union: WordSet | None) -> np.ndarray:
    """The ``[N, features]`` matrix of one column from one extraction."""
    kind, group = FEATURE_COLUMNS[column]
    if kind == "p_f":  # V-dimensional: probed through its N × N kernel matrix, exactly (probe.row_space_features)
        return probe.row_space_features(extracted[kind])
    if group is None:
        return extracted[kind]
    return extracted[kind][:, word_columns(union, word_sets[group])]


# --------------------------------------------------------------------------------------------------- cells


def cell_key(task: str, prompt: bool, column: str, repeat: int) -> str:
    return f"{task}{'*' if prompt else ''}/{column}/{repeat}"


# Config keys that choose which cells exist or how they are shown, not their values.
# The zero-shot variant settings are part of each variant cell's key (ZeroShotVariant.key) instead; the zero-shot
# column's cell records its rule and is re-derived from its variant cell when config.zeroshot.rule changes.
NOT_DETERMINING = ("program", "tasks", "columns", "batch_size", "bert.enabled", "ft.enabled", "ft.progress",
                   "zeroshot.enabled", "zeroshot.shots", "zeroshot.sensitivity_shots", "zeroshot.templates",
                   "zeroshot.verbalizers", "zeroshot.balanced", "zeroshot.separator", "zeroshot.seed",
                   "zeroshot.rule", "prompt_probes.templates", "prompt_probes.shots", "resume_may_change",
                   "probe.p_f_memory_gb")
# The code behind a cell's value once features exist (features carry their own code fingerprint).
RESULT_CODE = ("sentcomp.probe", "sentcomp.zeroshot", "sentcomp.training.finetune", "sentcomp.kernels.logistic",
               "sentcomp.kernels.lbfgs", "sentcomp.kernels.ridge", "sentcomp.kernels.linear")


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


def check_multinomial_cells(cells: Sequence[str]) -> None:
    """``probe.multinomial_cells`` entries are ``"task:column"`` with a known feature column."""
    bad = [c for c in cells if c.count(":") != 1 or c.split(":")[1] not in FEATURE_COLUMNS]
    if bad:
        raise SentcompError(f"config.probe.multinomial_cells entries must be 'task:column' with a column of "
                            f"{list(FEATURE_COLUMNS)}; got {bad}.")


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
    result = probe.evaluate(
        x[train_rows], train.labels, x[test_rows], test.labels, protocol=probe_config.protocol,
        multi_class=multi_class, standardize=probe_config.standardize, n_folds=probe_config.n_folds,
        seed=probe_config.seed, max_iter=probe_config.max_iter, n_experiments=probe_config.n_experiments,
        samples_per_label=probe_config.samples_per_label, penalize_intercept=probe_config.penalize_intercept,
        shuffle_folds=probe_config.shuffle_folds,
    )
    keep = ("test_accuracy", "test_macro_f1", "test_loss", "train_accuracy", "regularisation", "regularisation_name",
            "grid", "converged", "iterations", "multi_class", "cv_fits", "cv_not_converged")
    return {**{k: result[k] for k in keep}, "cv_mean": np.asarray(result["cv_mean"]).tolist(),
            "n_features": int(x.shape[1])}


# ------------------------------------------------------------------------------------------ baseline columns


def baseline_columns(config) -> list[str]:
    """The enabled columns of :func:`baseline_features`."""
    return [BERT] if config.bert.enabled else []


@functools.lru_cache(maxsize=1)
def _bert_encoder(source: str):
    return models.load(source)


def baseline_features(config, texts: Sequence[str], prompt: str | None,
                      cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Extra feature columns from other models, probed exactly like the LM's (``{column: [N, features]}``).

    BERT column (``config.bert``): the paper's BERT-base-cased baseline, ``[CLS]`` after the MLM head's transform
    with the prompt before ``[SEP]`` (:func:`sentcomp.baselines.bert_features`; ``config.bert.pooling``).
    """
    if not config.bert.enabled:
        return {}
    from sentcomp.baselines import bert_features

    return {BERT: bert_features(_bert_encoder(config.bert.model), texts, prompt, pooling=config.bert.pooling,
                                max_length=config.max_length, batch_size=config.batch_size,
                                truncation=config.truncation, cache_dir=cache_dir)}


def finetune_config(config, n_train: int, prompt: str | None):
    """:func:`sentcomp.training.finetune.finetune_accuracy`'s options (a
    :class:`~sentcomp.training.finetune.FinetuneOptions`) from ``config.ft`` (``num_epochs`` > 0 sets
    ``max_steps`` = ⌈epochs · N_train / batch⌉)."""
    from sentcomp.training.finetune import FinetuneOptions

    ft = config.ft.to_dict()
    ft.pop("enabled")
    epochs = ft.pop("num_epochs", 0)
    if epochs > 0:
        ft["max_steps"] = max(1, -(-int(epochs * n_train) // ft.get("batch_size", FinetuneOptions.batch_size)))
    return FinetuneOptions.from_mapping({"prompt": prompt, "max_length": config.max_length, "seed": config.seed, **ft})


def finetune_cells(config, task: Task, pairs, prompt: str | None, workdir: Path, lm_loader,
                   log: CellLog) -> Iterable[dict]:
    """Cells of the fine-tuning column (``config.ft``: the LM + a linear head on the last token trained end to
    end, :func:`sentcomp.training.finetune.finetune_accuracy`), one per split not yet in ``log``; each run has its own
    resumable workdir ``workdir/finetune/<row>-<split>``."""
    if not config.ft.enabled:
        return
    from sentcomp.training.finetune import finetune_accuracy

    row = task.name + ("*" if prompt is not None else "")
    for repeat, (train, test) in enumerate(pairs):
        key = cell_key(task.name, prompt is not None, FINETUNE, repeat)
        if key in log:
            continue
        result = finetune_accuracy(lm_loader(), train, test, finetune_config(config, len(train), prompt),
                                   workdir / "finetune" / f"{row}-{repeat}")
        yield {"key": key, "row": row, "column": FINETUNE, "repeat": repeat, **result}


# ------------------------------------------------------------------------------------------------- tables


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


def format_accuracy(entry: dict | None, n_test: int | None = None) -> str:
    """``85.3`` (percent), ``85.3 ± 1.2`` over several splits, ``—`` when the cell does not apply; with
    ``n_test``, followed by the 95% Wilson interval ``[82.0, 88.1]`` of the accuracy over all the cell's test
    predictions (``n_test`` per split, pooled)."""
    if entry is None:
        return "—"
    text = f"{100 * entry['mean']:.1f}"
    text = text + f" ± {100 * entry['std']:.1f}" if entry["n_splits"] > 1 else text
    if not n_test:
        return text
    trials = n_test * entry["n_splits"]
    low, high = wilson_interval(entry["mean"] * trials, trials)
    return f"{text} [{100 * low:.1f}, {100 * high:.1f}]"


def accuracy_table(table: dict[str, dict[str, dict]], rows: Sequence[str], columns: Sequence[str],
                   n_test: dict[str, int] | None = None) -> str:
    """The paper-like table: one row per ``task`` / ``task*``, one column per feature kind (+ zero-shot); with
    ``n_test`` (row -> test examples per split), every accuracy gets its 95% interval."""
    n_test = n_test or {}
    return markdown_table(["task", *(COLUMN_TITLES[c] for c in columns)],
                          ([row, *(format_accuracy(table.get(row, {}).get(c), n_test.get(row)) for c in columns)]
                           for row in rows))


def probe_modes(probe_config: dict) -> str:
    """``"ovr"``, or ``"ovr; multinomial for sst5:subset_logits, …"`` when some cells are exceptions."""
    if probe_config.get("protocol") == "mteb":
        return "multinomial (MTEB)"
    exceptions = probe_config.get("multinomial_cells", ())
    return probe_config["multi_class"] + (f"; multinomial for {', '.join(exceptions)}" if exceptions else "")


def cv_convergence(cell: dict) -> str:
    """``"0 / 40"``, or ``"⚠ 3 / 40"`` when some cross-validation fit did not converge."""
    missed, fits = cell.get("cv_not_converged", 0), cell.get("cv_fits", 0)
    return f"{'⚠ ' if missed else ''}{missed} / {fits}"


def probe_variants_markdown(entries: Sequence[dict]) -> list[str]:
    """The prompt-row probes under other templates and after a k-shot prefix (``config.prompt_probes``)."""
    rows = list(dict.fromkeys(row for entry in entries for row in entry["accuracies"]))
    return [
        "## Prompt-row probes: templates and k-shot prefix",
        markdown_table(["task", "column", *rows, "mean", "min", "max"],
                       ([e["task"], COLUMN_TITLES[e["column"]],
                         *(f"{100 * e['accuracies'][row]:.1f}" if row in e["accuracies"] else "—" for row in rows),
                         f"{100 * e['mean']:.1f}", f"{100 * e['min']:.1f}", f"{100 * e['max']:.1f}"]
                        for e in entries)),
        "Test accuracy (%) of each probe with the task's prompt (`task*`), each other template (`task*tT`, the "
        "templates of the prompt-sensitivity table) and after a k-shot prefix (`task*kK`; its demonstrations are "
        "left out of the probe's training set); mean, min and max over the templates (k-shot row excluded).",
    ]


def results_markdown(results: dict) -> str:
    """results.md: the accuracy table, macro-F1, the zero-shot sections (when run), data, words and probes."""
    rows = [row for task in results["tasks"] for row in (task["name"], task["name"] + "*")]
    n_test = {row: task["n_test"] for task in results["tasks"] for row in (task["name"], task["name"] + "*")}
    f1_columns = [c for c in results["columns"] if any(c in entries for entries in results["macro_f1"].values())]
    parts = [
        f"# Table 1: linear probes on {results['model']} features",
        accuracy_table(results["table"], rows, results["columns"], n_test),
        f"Test accuracy (%) [95% Wilson interval over the test predictions]. `task*`: the task's prompt appended "
        f"to every text. Probe protocol `{results['probe']['protocol']}` ({probe_modes(results['probe'])}); mean "
        "± std over the splits of tasks without an official split (their interval pools every split's "
        "predictions, which overlap across splits: read it as indicative). Zero-shot: sentence completion with "
        "the label words (prompt rows only).",
        f"![Test accuracy with 95% Wilson intervals]({FIGURE_FILE})",
        "## Macro-F1",
        accuracy_table(results["macro_f1"], rows, f1_columns),
        "Test macro-F1 (%) of the same probes (the mean over classes of each class's F1).",
        *(zeroshot_markdown(results["zeroshot"], results["tasks"]) if "zeroshot" in results else []),
        *(probe_variants_markdown(results["probe_variants"]) if "probe_variants" in results else []),
        "## Data",
        markdown_table(["task", "N train", "N test", "splits", "prompt", "label words", "truncated texts"],
                       ([t["name"], t["n_train"], t["n_test"], t["n_splits"], repr(t["prompt"]),
                         "; ".join(f"{k}: {', '.join(v)}" for k, v in t["label_words"].items()),
                         t.get("n_truncated", "")] for t in results["tasks"])),
        "## Words",
        markdown_table(["task", "set", "kept (single-token forms)", "dropped"],
                       ([t["name"], group, " ".join(repr(f) for f in ws["forms"]), ", ".join(ws["dropped"]) or "—"]
                        for t in results["tasks"] for group, ws in t["word_sets"].items())),
        "## Probes",
        markdown_table(["cell", "regularisation", "train acc", "test acc", "features", "converged",
                        "CV fits not converged"],
                       ([c["key"], f"{c['regularisation_name']}={c['regularisation']:g}",
                         f"{100 * c['train_accuracy']:.1f}", f"{100 * c['test_accuracy']:.1f}", c["n_features"],
                         c["converged"], cv_convergence(c)] for c in results["cells"] if "regularisation" in c)),
        "`converged`: the final probe's fit; the last column counts the cross-validation fits that chose the "
        "regularisation and stopped short of their tolerance (⚠ when any did: raise `probe.max_iter`).",
        *(timings_markdown(results["timings"]) if "timings" in results else []),
    ]
    return "\n\n".join(parts) + "\n"


def timings_markdown(record: dict) -> list[str]:
    """The cost section of results.md: each part's wall seconds and XLA compilations (:mod:`~results.timings`)."""
    rows = [*record["parts"], {"part": "total", **record["total"]}]
    return [
        "## Timings",
        markdown_table(["part", "seconds", "compilations", "compile s", "from the compilation cache"],
                       ([entry["part"], f"{entry['seconds']:.1f}", entry["compilations"],
                         f"{entry['compile_seconds']:.1f}", entry["cache_hits"]] for entry in rows)),
        f"Wall time of this run's parts (parts resumed from an earlier run are not run, so not listed); load "
        f"average (1, 5, 15 min) at the end: {', '.join(str(x) for x in record['load_average'])}; float32 2048² "
        f"matmul rate at the end: {record.get('float32_matmul_gflops', '?')} GFLOP/s; compilation cache: "
        f"{record['compilation_cache'] or 'off'}.",
    ]


# ---------------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class TaskData:
    task: Task
    pairs: list[tuple[Split, Split]]
    texts: list[str]  # the unique texts of every split: rows of the feature matrices
    pair_rows: list[tuple[np.ndarray, np.ndarray]]
    prompt_extraction: dict | None = None  # the prompt row's extraction, when this run made it (zero-shot reuses it)


def prepare_task(name: str, config) -> TaskData:
    task = get_task(name)
    splits = load_task(task, config.data_dir or None, source=config.data_source)
    pairs = task_pairs(task, splits, config.n_train, config.n_test, config.n_repeats, config.seed)
    texts = unique_texts(pairs)
    pool = {text: row for row, text in enumerate(texts)}
    return TaskData(task, pairs, texts, [(rows_of(a.texts, pool), rows_of(b.texts, pool)) for a, b in pairs])


def _extraction_options(config, workdir: Path) -> dict:
    return dict(max_length=config.max_length, batch_size=config.batch_size, truncation=config.truncation,
                compute_dtype=config.compute_dtype, projection_seed=config.projection_seed,
                cache_dir=workdir / "features")


def row_features(lm, task: Task, texts: Sequence[str], columns: Sequence[str], prompt: str | None, config,
                 workdir: Path, extra_words: Sequence[str] = ()
                 ) -> tuple[dict[str, np.ndarray], dict[str, WordSet], dict]:
    """The feature matrix of every column for ``texts`` (+ ``prompt``), from one extraction; the word sets; and
    the raw extraction (its metadata; with ``extra_words``, also their ``word_log_probs``, the union's columns)."""
    groups = word_groups(task)
    word_sets = {group: word_set(lm.tokenizer, words) for group, words in groups.items()}
    check_word_columns(columns, word_sets, lm.name)
    every_word = extraction_words(task, extra_words)
    union = word_set(lm.tokenizer, every_word) if every_word else None
    kinds = tuple(dict.fromkeys([*(FEATURE_COLUMNS[c][0] for c in columns),
                                 *(("word_log_probs",) if extra_words else ())])) or ("f",)
    extracted = extract_features(lm, texts, kinds, words=union.words if union else None, prompt=prompt,
                                 **_extraction_options(config, workdir))
    return {c: column_features(extracted, c, word_sets, union) for c in columns}, word_sets, extracted


def probe_variants(task: Task, config) -> list[tuple[str, str, int]]:
    """``(row, template, k)`` of the extra prompt rows ``config.prompt_probes`` asks for: the prompt row under
    each other template (``templates``; rows ``task*t1``, ``task*t2``, ...), and after a k-shot prefix of the
    task's prompt and label words (``shots`` > 0; row ``task*k<shots>``)."""
    variants = []
    if config.prompt_probes.templates:
        templates = zeroshot_templates(task, config.zeroshot)[0]
        variants += [(f"{task.name}*t{t}", template, 0) for t, template in enumerate(templates) if t]
    if config.prompt_probes.shots:
        variants.append((f"{task.name}*k{config.prompt_probes.shots}", task.prompt, config.prompt_probes.shots))
    return variants


def probe_variant_key(row: str, template: str, k: int, column: str, repeat: int, zs) -> str:
    """A probe-variant cell's key: the template and k-shot sampling settings hashed in (they are not determinants)."""
    return f"{row}@{storage.content_hash(template, k, (zs.balanced, zs.separator, zs.seed) if k else None)}/" \
           f"{column}/{repeat}"


def run_probe_variants(lm_loader, data: TaskData, config, workdir: Path, log: CellLog, columns: Sequence[str]) -> None:
    """The prompt row's probes under :func:`probe_variants` (off by default: one feature extraction per variant
    and split). With a k-shot prefix, the demonstrations come from the split's train set (never a test text),
    precede every train and test text alike, and are left out of the probe's training set."""
    task, zs = data.task, config.zeroshot
    for row, template, k in probe_variants(task, config):
        for r, (train, test) in enumerate(data.pairs):
            todo = [c for c in columns if probe_variant_key(row, template, k, c, r, zs) not in log]
            if not todo:
                continue
            variant = ZeroShotVariant(k, 0, 0, template, dict(task.label_words))
            prefix, chosen = _demonstrations(variant, task, train, test, zs)
            keep = np.setdiff1d(np.arange(len(train)), chosen)
            kept_train = Split([train.texts[i] for i in keep], train.labels[keep])
            texts = list(dict.fromkeys([*kept_train.texts, *test.texts]))
            lm = lm_loader()
            with timings.part(f"features {row}"):
                features, word_sets, _ = row_features(lm, task, [prefix + text for text in texts], todo, template,
                                                      config, workdir)
            pool = {text: i for i, text in enumerate(texts)}
            pair_rows = (rows_of(kept_train.texts, pool), rows_of(test.texts, pool))
            for column in todo:
                cell = probe_cell(features[column], pair_rows, (kept_train, test), config.probe,
                                  cell_multi_class(config.probe, task.name, column))
                log.add({"key": probe_variant_key(row, template, k, column, r, zs), "kind": "probe_variant",
                         "row": row, "variant_column": column, "repeat": r, "template": template, "k": k,
                         "demonstrations": chosen, "n_train": len(kept_train), **cell})


def probe_variant_cells(data: TaskData, config, log: CellLog) -> list[dict]:
    """The probe-variant cells of the current config."""
    columns = columns_for(data.task, config.columns)
    return [log.cells[probe_variant_key(row, template, k, c, r, config.zeroshot)]
            for row, template, k in probe_variants(data.task, config) for c in columns for r in range(len(data.pairs))]


def probe_sensitivity(table: dict[str, dict[str, dict]], variant_cells: Sequence[dict],
                      tasks: Sequence[str]) -> list[dict]:
    """Per task and probe column: the accuracy of the prompt row (``task*``) and of each probe variant row
    (mean over splits), and their mean, min and max over the templates (the ``t`` rows with ``task*``)."""
    by_row = summarise({**cell, "column": cell["variant_column"]} for cell in variant_cells)
    varied = {cell["variant_column"] for cell in variant_cells}  # the config's columns, not every one logged
    entries = []
    for name in tasks:
        for column, entry in table.get(name + "*", {}).items():
            if column not in varied:
                continue
            rows = {name + "*": entry["mean"], **{row: cells[column]["mean"] for row, cells in by_row.items()
                                                  if row.startswith(name + "*") and column in cells}}
            templates = [value for row, value in rows.items() if row == name + "*" or row[len(name) + 1] == "t"]
            entries.append({"task": name, "column": column, "accuracies": rows, "mean": float(np.mean(templates)),
                            "min": min(templates), "max": max(templates), "n_templates": len(templates)})
    return entries


def run_task(lm_loader, data: TaskData, config, workdir: Path, log: CellLog) -> dict:
    """Every cell of one task (skipping those in ``log``); returns the task's description for results.json."""
    task, name = data.task, data.task.name
    columns = columns_for(task, config.columns)
    groups = word_groups(task)
    description = {
        "name": name, "prompt": task.prompt, "n_splits": len(data.pairs),
        "n_train": len(data.pairs[0][0]), "n_test": len(data.pairs[0][1]),
        "label_words": {label: list(words) for label, words in task.label_words.items()},
    }
    meta_key = f"{name}/metadata"
    for with_prompt in (False, True):
        prompt = task.prompt if with_prompt else None
        todo = [(c, r) for c in [*columns, *baseline_columns(config)] for r in range(len(data.pairs))
                if cell_key(name, with_prompt, c, r) not in log]
        needs_metadata = with_prompt and meta_key not in log
        if todo or needs_metadata:
            lm = lm_loader()
            extra_words = prompt_zeroshot_words(task, config) if with_prompt else ()
            with timings.part(f"features {name}{'*' * with_prompt}"):
                features, word_sets, extracted = row_features(lm, task, data.texts, columns, prompt, config, workdir,
                                                              extra_words)
                features.update(baseline_features(config, data.texts, prompt, workdir / "features"))
            if extra_words:
                data.prompt_extraction = extracted
            if needs_metadata:
                log.add({"key": meta_key, "word_sets": {g: ws.to_json() for g, ws in word_sets.items()},
                         "n_truncated": extracted["metadata"]["n_truncated"],
                         "n_tokens": extracted["metadata"]["n_tokens"]})
            for column, repeat in tqdm(todo, desc=f"probes {name}{'*' if with_prompt else ''}"):
                with timings.part(f"probes {name}{'*' * with_prompt}"):
                    cell = probe_cell(features[column], data.pair_rows[repeat], data.pairs[repeat], config.probe,
                                      cell_multi_class(config.probe, name, column))
                kind, group = FEATURE_COLUMNS.get(column, (column, None))
                log.add({"key": cell_key(name, with_prompt, column, repeat), "row": name + "*" * with_prompt,
                         "column": column, "repeat": repeat, "kind": kind,
                         "words": list(word_sets[group].forms) if group else None, **cell})
        for cell in finetune_cells(config, task, data.pairs, prompt, workdir, lm_loader, log):
            log.add(cell)
    run_probe_variants(lm_loader, data, config, workdir, log, columns)
    if config.zeroshot.enabled:
        run_zeroshot(lm_loader, data, config, log)
        templates, verbalizers = zeroshot_templates(task, config.zeroshot)
        description.update(templates=list(templates), verbalizers=[
            {label: list(words) for label, words in verbalizer.items()} for verbalizer in verbalizers])
    meta = log.cells[meta_key]
    description.update(word_sets={g: {k: meta["word_sets"][g][k] for k in ("forms", "dropped")} for g in groups},
                       n_truncated=meta["n_truncated"], n_tokens_with_prompt=meta["n_tokens"])
    return description


# ----------------------------------------------------------------------------------------------- zero-shot


@dataclasses.dataclass(frozen=True)
class ZeroShotVariant:
    """One way of asking the LM: ``k`` demonstrations, template ``templates[t]``, verbalizer ``verbalizers[v]``."""

    k: int
    t: int
    v: int
    template: str
    verbalizer: dict[str, tuple[str, ...]]

    def key(self, task: str, repeat: int, zs) -> str:
        """The cell key: the variant's content (and the k-shot sampling settings) hashed, so changing the
        templates, verbalizers or shots never reuses another variant's cell (nor invalidates the others)."""
        sampling = (zs.balanced, zs.separator, zs.seed) if self.k else None
        digest = storage.content_hash(self.template, self.verbalizer, self.k, sampling)
        return cell_key(task, True, f"{ZEROSHOT}:{self.k}-shot:{digest}", repeat)

    def describe(self) -> dict:
        return {"k": self.k, "t": self.t, "v": self.v, "template": self.template,
                "verbalizer": {label: list(words) for label, words in self.verbalizer.items()}}


def parse_verbalizer(text: str, label_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``"terrible;great"`` (one entry per label, in label order; a label's alternatives joined by ``,``, e.g.
    ``"bad,awful;good"``) -> ``{label: words}``."""
    parts = [tuple(word.strip() for word in part.split(",")) for part in text.split(";")]
    if len(parts) != len(label_names) or not all(all(parts_) for parts_ in parts):
        raise SentcompError(f"config.zeroshot.verbalizers entry {text!r} must give non-blank word(s) for each of the "
                            f"{len(label_names)} labels {list(label_names)}, separated by ';' (alternatives by ','), "
                            "e.g. 'terrible;great'.")
    return dict(zip(label_names, parts))


def zeroshot_templates(task: Task, zs) -> tuple[tuple[str, ...], tuple[dict[str, tuple[str, ...]], ...]]:
    """The templates and verbalizers to use: ``config.zeroshot.templates`` / ``.verbalizers``, or the task's
    (:attr:`Task.prompt_templates`, :attr:`Task.label_verbalizers`: its prompt and label words first)."""
    templates = tuple(zs.templates) or task.prompt_templates
    verbalizers = (tuple(parse_verbalizer(v, task.label_names) for v in zs.verbalizers)
                   or task.label_verbalizers)
    return templates, verbalizers


def zeroshot_plan(task: Task, zs) -> list[ZeroShotVariant]:
    """Every variant to score: template 0 with verbalizer 0 at ``k = 0`` (the table's zero-shot column) and at
    each k of ``zs.shots`` (the scoring-rule table), and every template × verbalizer at each k of
    ``zs.sensitivity_shots`` (the prompt-sensitivity table)."""
    templates, verbalizers = zeroshot_templates(task, zs)
    chosen = {(0, 0, 0), *((k, 0, 0) for k in zs.shots)}
    chosen |= {(k, t, v) for k in zs.sensitivity_shots for t in range(len(templates)) for v in range(len(verbalizers))}
    return [ZeroShotVariant(k, t, v, templates[t], verbalizers[v]) for k, t, v in sorted(chosen)]


def check_zeroshot_config(config) -> None:
    """``config.zeroshot`` and ``config.prompt_probes`` are usable: a known headline ``rule``, shots ≥ 0 (k > 0
    needs ``truncation="start"``,
    which drops the demonstrations before the test text), non-blank templates, verbalizers that fit every task
    of ``config.tasks``, ``ece_bins`` ≥ 1. Raises one :class:`SentcompError` naming the key and the fix."""
    zs = config.zeroshot
    zeroshot.check_rule(zs.rule)
    for key in ("shots", "sensitivity_shots"):
        values = zs[key]
        if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in values):
            raise SentcompError(f"config.zeroshot.{key} must be a tuple of numbers of demonstrations k ≥ 0, got "
                                f"{values!r}; e.g. --config.zeroshot.{key}='(0, 4)'.")
    shots = config.prompt_probes.shots
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise SentcompError(f"config.prompt_probes.shots must be a number of demonstrations k ≥ 0 (0: none), got "
                            f"{shots!r}.")
    if config.truncation != "start" and any(k > 0 for k in (*zs.shots, *zs.sensitivity_shots, shots)):
        raise SentcompError("k-shot contexts (config.zeroshot.shots / sensitivity_shots, prompt_probes.shots > 0) need "
                            f"config.truncation='start' (got {config.truncation!r}): with 'end' a long context "
                            "would lose the test text and the prompt instead of the demonstrations.")
    if not all(isinstance(t, str) and t.strip() for t in zs.templates):
        raise SentcompError(f"config.zeroshot.templates must be non-blank prompts such as ' This movie is ', got "
                            f"{tuple(zs.templates)!r} (empty tuple: each task's own templates).")
    if not isinstance(zs.separator, str):
        raise SentcompError(f"config.zeroshot.separator must be a string such as '\\n\\n', got {zs.separator!r}.")
    if not isinstance(zs.ece_bins, int) or zs.ece_bins < 1:
        raise SentcompError(f"config.zeroshot.ece_bins must be a positive number of bins, got {zs.ece_bins!r}.")
    for name in config.tasks:
        for template in zeroshot_templates(get_task(name), zs)[0]:
            zeroshot.check_template(template)


def _score_options(config) -> dict:
    return dict(batch_size=config.batch_size, max_length=config.max_length, compute_dtype=config.compute_dtype,
                truncation=config.truncation)


def _demonstrations(variant: ZeroShotVariant, task: Task, train: Split, test: Split, zs) -> tuple[str, list[int]]:
    """The k-shot prefix of ``variant`` for one split (demonstrations from its train set, never a test text)."""
    if not variant.k:
        return "", []
    chosen = sample_demonstrations(train.texts, train.labels, variant.k, zs.seed, zs.balanced, exclude=test.texts)
    words = [variant.verbalizer[task.label_names[train.labels[i]]][0] for i in chosen]
    prefix = demonstration_prefix([train.texts[i] for i in chosen], words, variant.template, zs.separator)
    return prefix, [int(i) for i in chosen]


def check_demonstrations(data: TaskData, zs) -> None:
    """Every k-shot context of :func:`zeroshot_plan` can be drawn from each split's train set (a balanced one
    needs ``k / C`` examples of every class): checked once the data is read, before the model loads, instead of
    failing after every probe ran."""
    if not zs.enabled:
        return
    for k in sorted({variant.k for variant in zeroshot_plan(data.task, zs) if variant.k}):
        for train, test in data.pairs:
            sample_demonstrations(train.texts, train.labels, k, zs.seed, zs.balanced, exclude=test.texts)


def run_zeroshot(lm_loader, data: TaskData, config, log: CellLog) -> None:
    """Every zero-shot variant cell of :func:`zeroshot_plan` not yet in ``log`` (each holds accuracy, ECE and
    Brier under every scoring rule), then the table's ``zeroshot`` column (template 0, verbalizer 0, k = 0, rule
    ``config.zeroshot.rule``). One model pass per template at k = 0 (the union of its verbalizers' words over the
    unique test texts of all splits), one per variant and split at k > 0 (the prefix depends on both)."""
    task, zs, name = data.task, config.zeroshot, data.task.name
    todo = [(variant, r) for variant in zeroshot_plan(task, zs) for r in range(len(data.pairs))
            if variant.key(name, r, zs) not in log]
    passes: dict[tuple, list[tuple[ZeroShotVariant, int]]] = {}
    for variant, r in todo:  # k = 0: one pass per template; k > 0: one per variant and split
        passes.setdefault((variant.t,) if not variant.k else (variant.t, variant.k, variant.v, r), []).append(
            (variant, r))
    for members in passes.values():
        template = members[0][0].template
        repeats = list(dict.fromkeys(r for _, r in members))
        texts = list(dict.fromkeys(text for r in repeats for text in data.pairs[r][1].texts))
        words = list(dict.fromkeys(w for variant, _ in members for w in zeroshot.verbalizer_words(
            task.label_names, variant.verbalizer)[0]))
        train, test = data.pairs[members[0][1]]
        prefix, chosen = _demonstrations(members[0][0], task, train, test, zs)
        lm = lm_loader()
        with timings.part(f"zero-shot {name}* {template.strip()!r} k={members[0][0].k}"):
            reuse = not prefix and template == task.prompt and data.prompt_extraction is not None
            scores = scores_from_prompt_features(lm, data, texts, template, words, config) if reuse else None
            if scores is None:
                scores = zeroshot.score_words(lm, texts, template, words, prefix, **_score_options(config))
        pool = {text: row for row, text in enumerate(texts)}
        for variant, r in members:
            variant_words, word_labels = zeroshot.verbalizer_words(task.label_names, variant.verbalizer)
            by_rule = zeroshot.rule_scores(scores.select(variant_words), word_labels, task.num_classes)
            test = data.pairs[r][1]
            rows = rows_of(test.texts, pool)
            log.add({"key": variant.key(name, r, zs), "kind": "zeroshot_variant", "row": name + "*", "repeat": r,
                     **variant.describe(), "demonstrations": chosen, "prefix_chars": len(prefix),
                     "rules": {rule: zeroshot.evaluate_scores(scores_[rows], test.labels, zs.ece_bins)
                               for rule, scores_ in by_rule.items()}})
    headline = ZeroShotVariant(0, 0, 0, *(first[0] for first in zeroshot_templates(task, zs)))
    for r in range(len(data.pairs)):
        key = cell_key(name, True, ZEROSHOT, r)
        if key not in log or log.cells[key].get("rule") != zs.rule:
            variant_cell = log.cells[headline.key(name, r, zs)]
            log.add({"key": key, "row": name + "*", "column": ZEROSHOT, "repeat": r,
                     "test_accuracy": variant_cell["rules"][zs.rule]["accuracy"], "rule": zs.rule,
                     "words": list(zeroshot.verbalizer_words(task.label_names, headline.verbalizer)[0])})


def prompt_zeroshot_words(task: Task, config) -> tuple[str, ...]:
    """The zero-shot words scored at k = 0 right after the task's prompt (the variants of :func:`zeroshot_plan`
    with k = 0 whose template is ``task.prompt``): the prompt row's feature pass extracts their log-probabilities
    too, so those variants need no pass of their own (:func:`scores_from_prompt_features`)."""
    if not config.zeroshot.enabled:
        return ()
    return tuple(dict.fromkeys(word for variant in zeroshot_plan(task, config.zeroshot)
                               if not variant.k and variant.template == task.prompt
                               for word in zeroshot.verbalizer_words(task.label_names, variant.verbalizer)[0]))


def scores_from_prompt_features(lm, data: TaskData, texts: Sequence[str], template: str, words: Sequence[str],
                                config) -> zeroshot.WordScores | None:
    """:func:`sentcomp.zeroshot.score_words` of ``texts`` at k = 0 read off the prompt row's extraction
    (``data.prompt_extraction``, ``word_log_probs`` at f(s) of ``text + template``), when that is the same
    computation: every word's continuation is one token among the extraction's words and every context is the
    extraction's token sequence (so ``log p(w | context)`` is the extracted value). The content-free texts are
    scored by the model (one small batch). None when any of this does not hold (the caller runs its own pass)."""
    extraction = data.prompt_extraction
    max_length = min(config.max_length, lm.max_length)
    rows = zeroshot.build_rows(lm.tokenizer, texts, template, words, max_length, config.truncation)
    contexts = encode_texts(lm.tokenizer, texts, max_length, template, truncation=config.truncation).token_ids
    columns = {token: column for column, token in enumerate(extraction["metadata"]["words"]["token_ids"])}
    if not all(row.start == len(row.input_ids) - 1 and tuple(int(t) for t in contexts[row.document]) == row.input_ids
               and all(len(target) == 1 and target[0] in columns for target in row.targets) for row in rows):
        return None
    pool = {text: index for index, text in enumerate(data.texts)}
    log_probs = extraction["word_log_probs"]
    scores = np.full((len(texts), len(words)), np.nan)
    for row in rows:
        scores[row.document, list(row.words)] = log_probs[pool[texts[row.document]],
                                                          [columns[target[0]] for target in row.targets]]
    content_free = zeroshot.word_scores(lm, zeroshot.CONTENT_FREE_TEXTS, template, words, progress=False,
                                        **_score_options(config))
    return zeroshot.WordScores(tuple(words), scores, content_free)


def zeroshot_cells(data: TaskData, config, log: CellLog) -> list[dict]:
    """The variant cells of the current plan (cells of other templates or shots in the log are left out)."""
    return [log.cells[v.key(data.task.name, r, config.zeroshot)] for v in zeroshot_plan(data.task, config.zeroshot)
            for r in range(len(data.pairs))]


RULE_TITLES = {"ll": "log-likelihood", "acc_norm": "acc_norm (÷ characters)", "pmi": "PMI (template alone)",
               "calibrated": "contextual calibration"}


def zeroshot_summary(cells: Sequence[dict], sensitivity_shots: Sequence[int]) -> dict[str, list[dict]]:
    """``{"rules": [...], "sensitivity": [...]}`` from variant cells.

    ``rules``: per row, k and rule, template 0 / verbalizer 0: accuracy (mean, std over splits; Wilson interval
    over the pooled test predictions), mean ECE and Brier. ``sensitivity``: per row, k of ``sensitivity_shots``
    and rule, the accuracy of each template × verbalizer (mean over splits) and their mean, min and max.
    """
    grouped: dict[tuple, list[dict]] = {}
    for cell in cells:
        grouped.setdefault((cell["row"], cell["k"], cell["t"], cell["v"]), []).append(cell)
    rules, sensitivity = [], []
    for (row, k, t, v), group in grouped.items():
        if (t, v) != (0, 0):
            continue
        for rule in zeroshot.SCORING_RULES:
            values = [cell["rules"][rule] for cell in group]
            accuracies = [value["accuracy"] for value in values]
            trials = sum(value["n"] for value in values)
            low, high = wilson_interval(sum(value["accuracy"] * value["n"] for value in values), trials)
            rules.append({"row": row, "k": k, "rule": rule, "mean": float(np.mean(accuracies)),
                          "std": float(np.std(accuracies)), "n_splits": len(values), "low": low, "high": high,
                          "ece": float(np.mean([value["ece"] for value in values])),
                          "brier": float(np.mean([value["brier"] for value in values]))})
    for row, k in dict.fromkeys((row, k) for row, k, _, _ in grouped if k in sensitivity_shots):
        variants = {(t, v): group for (row_, k_, t, v), group in grouped.items() if (row_, k_) == (row, k)}
        for rule in zeroshot.SCORING_RULES:
            accuracy = {f"t{t}/v{v}": float(np.mean([cell["rules"][rule]["accuracy"] for cell in group]))
                        for (t, v), group in sorted(variants.items())}
            values = list(accuracy.values())
            sensitivity.append({"row": row, "k": k, "rule": rule, "mean": float(np.mean(values)),
                                "min": min(values), "max": max(values), "best": max(accuracy, key=accuracy.get),
                                "accuracies": accuracy})
    return {"rules": rules, "sensitivity": sensitivity}


def zeroshot_markdown(summary: dict, tasks: Sequence[dict]) -> list[str]:
    """The zero-shot sections of results.md: scoring rules × k, prompt sensitivity, templates and verbalizers."""
    def interval(entry):
        spread = f" ± {100 * entry['std']:.1f}" if entry["n_splits"] > 1 else ""
        return f"{100 * entry['mean']:.1f}{spread} [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]"

    return [
        "## Zero- and few-shot scoring rules",
        markdown_table(["task", "k", "rule", "accuracy", "ECE", "Brier"],
                       ([e["row"], e["k"], RULE_TITLES[e["rule"]], interval(e), f"{e['ece']:.3f}", f"{e['brier']:.3f}"]
                        for e in summary["rules"])),
        "Sentence completion with each task's first template and verbalizer, after k seeded demonstrations from "
        "train (docs/zeroshot.md). Accuracy (%) [95% Wilson interval]; ECE (10 equal-width bins of the top "
        "probability) and multi-class Brier score of the softmax over the labels' scores.",
        "## Prompt sensitivity",
        markdown_table(["task", "k", "rule", "mean", "min", "max", "best", "variants"],
                       ([e["row"], e["k"], RULE_TITLES[e["rule"]], f"{100 * e['mean']:.1f}", f"{100 * e['min']:.1f}",
                         f"{100 * e['max']:.1f}", e["best"], len(e["accuracies"])] for e in summary["sensitivity"])),
        "Zero-shot accuracy (%) over every template × verbalizer (`tT/vV`, listed below).",
        markdown_table(["task", "templates", "verbalizers"],
                       ([t["name"], "; ".join(f"t{i}: {template!r}" for i, template in enumerate(t["templates"])),
                         "; ".join(f"v{i}: " + " / ".join(",".join(words) for words in verbalizer.values())
                                   for i, verbalizer in enumerate(t["verbalizers"]))] for t in tasks)),
    ]


def table_columns(config) -> list[str]:
    extra = [c for c, sub in ((BERT, config.bert), (FINETUNE, config.ft)) if sub.enabled]
    return [*config.columns, *extra, *([ZEROSHOT] if config.zeroshot.enabled else [])]


def check_config(config) -> None:
    """What can be checked before any work (the launcher calls this before it claims the workdir): the tasks
    exist, ``data_dir`` is a directory, the model loads offline (:func:`sentcomp.models.hf.check_source`), the
    sizes are ≥ 1, the feature columns and multinomial cells are known, and the zero-shot settings are usable
    (:func:`check_zeroshot_config`)."""
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
    unknown = [column for column in config.columns if column not in FEATURE_COLUMNS]
    if unknown:
        raise SentcompError(f"Unknown feature columns {unknown}; choose from {list(FEATURE_COLUMNS)}.")
    check_multinomial_cells(config.probe.multinomial_cells)
    check_p_f_unscaled(config)
    pc = config.probe
    probe.check_settings(pc.protocol, pc.multi_class, n_folds=pc.n_folds, max_iter=pc.max_iter,
                         n_experiments=pc.n_experiments, samples_per_label=pc.samples_per_label)
    check_zeroshot_config(config)
    models.hf.check_source(config.model, config.revision, known=(models.RANDOM_GPT2, *models.ALIASES))
    if config.bert.enabled:
        models.hf.check_source(config.bert.model, known=tuple(models.ALIASES))


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


def check_p_f_memory(datas: Sequence[TaskData], config) -> None:
    """Refuses up front (before any model pass) a ``p_f`` column whose ``N × N`` kernel and eigendecomposition
    (:func:`sentcomp.probe.row_space_peak_bytes`) do not fit in ``config.probe.p_f_memory_gb`` (0: the memory
    available now)."""
    if "p_f" not in config.columns:
        return
    limit = config.probe.p_f_memory_gb * 1e9 if config.probe.p_f_memory_gb > 0 else None
    for data in datas:
        probe.check_row_space_fits(len(data.texts), limit_bytes=limit, what=f"p_f column of task {data.task.name!r}")


def run(config, workdir) -> dict:
    """Runs (or resumes) every task of ``config.tasks``; writes results.json/.md; returns the headline
    accuracies ``{"<row>/<column>": mean test accuracy}``."""
    workdir = Path(workdir)
    check_config(config)
    datas = [prepare_task(name, config) for name in config.tasks]
    check_p_f_memory(datas, config)
    for data in datas:
        check_demonstrations(data, config.zeroshot)
    log = CellLog(workdir / CELLS_FILE, results_fingerprint(config))
    lm_cache: list = []

    def lm_loader():  # the model is loaded only if some cell needs it
        if not lm_cache:
            with timings.part("load"):
                lm_cache.append(models.from_config(config))
        return lm_cache[0]

    with timings.recording() as record:  # the cost of each part of this run (resumed parts: not run, not timed)
        descriptions = [run_task(lm_loader, data, config, workdir, log) for data in datas]
    row_names = {name for data in datas for name in (data.task.name, data.task.name + "*")}
    cells = [c for c in log.cells.values() if "column" in c and c["row"] in row_names]
    table = summarise(cells)
    present = [c for c in table_columns(config) if any(c in row for row in table.values())]
    results = {
        "model": config.model, "probe": config.probe.to_dict(), "columns": present, "tasks": descriptions,
        "table": table, "macro_f1": summarise(cells, "test_macro_f1"), "cells": sorted(cells, key=lambda c: c["key"]),
        "extraction": {k: v for k, v in _extraction_options(config, workdir).items() if k != "cache_dir"},
        "timings": record.to_json(matmul_rate=True),
    }
    variant_cells = [cell for data in datas for cell in probe_variant_cells(data, config, log)]
    if variant_cells:
        results["probe_variants"] = probe_sensitivity(table, variant_cells, [data.task.name for data in datas])
    if config.zeroshot.enabled:
        results["zeroshot"] = zeroshot_summary([cell for data in datas for cell in zeroshot_cells(data, config, log)],
                                               config.zeroshot.sensitivity_shots)
    markdown = results_markdown(results)
    if parallel.is_main_process():
        storage.write_json(workdir / "results.json", results)
        storage.write_text(workdir / "results.md", markdown)
        tables.table1_figure(results, workdir / FIGURE_FILE, f"Table 1: linear probes on {config.model} features")
    print(markdown)
    return {f"{row}/{column}": entry["mean"] for row, entries in table.items() for column, entry in entries.items()}
