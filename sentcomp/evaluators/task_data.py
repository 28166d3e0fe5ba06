"""One task's data as Table 1 evaluates it: its (train, test) pairs, the unique texts of every split (the rows of
every feature matrix) and where each split's texts sit among them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sentcomp.data import Split, evaluation_splits, get_task, load_task, stratified_split
from sentcomp.data.tasks import Task


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
    """The rows of ``texts`` in a feature matrix whose row of each text is ``pool[text]``."""
    return np.fromiter((pool[text] for text in texts), np.int64, len(texts))


@dataclasses.dataclass
class TaskData:
    task: Task
    pairs: list[tuple[Split, Split]]
    texts: list[str]  # the unique texts of every split: rows of the feature matrices
    pair_rows: list[tuple[np.ndarray, np.ndarray]]
    prompt_extraction: dict | None = None  # the prompt row's extraction, when this run made it (zero-shot reuses it)


def prepare_task(name: str, config) -> TaskData:
    """The task's data under ``config`` (``data_dir``, ``data_source``, ``n_train``, ``n_test``, ``n_repeats``,
    ``seed``)."""
    task = get_task(name)
    splits = load_task(task, config.data_dir or None, source=config.data_source)
    pairs = task_pairs(task, splits, config.n_train, config.n_test, config.n_repeats, config.seed)
    texts = unique_texts(pairs)
    pool = {text: row for row, text in enumerate(texts)}
    return TaskData(task, pairs, texts, [(rows_of(a.texts, pool), rows_of(b.texts, pool)) for a, b in pairs])
