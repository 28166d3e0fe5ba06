"""The LM's feature columns of Table 1 (notation of ../shared/PAPER.md, ``h = f(s)``) and how one feature
extraction of a row serves them all (the word kinds over the union of all word sets, whose columns are then
selected per set).

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

Word columns use every single-token form ``" w"``/``"w"`` of their words (``sentcomp.data.text.word_set``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sentcomp import probe
from sentcomp.data.tasks import Task
from sentcomp.data.text import WordSet, word_set
from sentcomp.errors import SentcompError
from sentcomp.features import ExtractionOptions, RowRequest, extract_features

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


def word_groups(task: Task) -> dict[str, tuple[str, ...]]:
    """The task's non-empty word sets: ``subset``, ``class``, ``posneg`` (sentiment only)."""
    groups = {"subset": task.subset_words, "class": task.class_words, "posneg": task.posneg_words}
    return {name: tuple(words) for name, words in groups.items() if words}


def union_words(groups: Mapping[str, Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(word for words in groups.values() for word in words))


def extraction_words(task: Task, extra_words: Sequence[str] = ()) -> list[str]:
    """The words one extraction of a row resolves: its word groups' union, then ``extra_words`` (the prompt
    row's zero-shot words, :func:`sentcomp.evaluators.zeroshot.prompt_zeroshot_words`), each once."""
    return list(dict.fromkeys([*union_words(word_groups(task)), *extra_words]))


def word_columns(union: WordSet, group: WordSet) -> npt.NDArray[np.int64]:
    """Positions, among the union's token ids, of a group's token ids (one extraction serves every group)."""
    return np.array([union.token_ids.index(token) for token in group.token_ids], np.int64)


def check_columns(wanted: Sequence[str]) -> None:
    unknown = [c for c in wanted if c not in FEATURE_COLUMNS]
    if unknown:
        raise SentcompError(f"Unknown feature columns {unknown}; choose from {list(FEATURE_COLUMNS)}.")


def columns_for(task: Task, wanted: Sequence[str]) -> list[str]:
    """The feature columns of ``wanted`` that apply to ``task`` (word columns need a non-empty word set)."""
    check_columns(wanted)
    groups = word_groups(task)
    return [c for c in wanted if FEATURE_COLUMNS[c][1] is None or FEATURE_COLUMNS[c][1] in groups]


def check_word_columns(columns: Sequence[str], word_sets: dict[str, WordSet], model: str) -> None:
    """A word column needs some of its words to be single tokens of the model's tokenizer (none are for a
    byte-level one): refused before the features are extracted, naming the columns to drop."""
    empty = [column for column in columns
             if (group := FEATURE_COLUMNS[column][1]) is not None and group in word_sets
             and not word_sets[group].token_ids]
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
    if union is None:
        raise SentcompError(f"Column {column!r} reads the {group!r} words' columns of an extraction: pass the union "
                            "word set that extraction resolved (union=..., see row_features).")
    return extracted[kind][:, word_columns(union, word_sets[group])]


EXTRACTION_SETTINGS = ("max_length", "batch_size", "truncation", "compute_dtype", "projection_seed")  # config keys


def extraction_options(config, workdir: Path) -> ExtractionOptions:
    """Every feature extraction's options (:class:`sentcomp.features.ExtractionOptions`): the config's
    :data:`EXTRACTION_SETTINGS`, cached under ``workdir/features``."""
    return ExtractionOptions(**{key: config[key] for key in EXTRACTION_SETTINGS}, cache_dir=workdir / "features")


def row_request(lm, task: Task, columns: Sequence[str], prompt: str | None, extra_words: Sequence[str] = ()
                ) -> tuple[RowRequest, dict[str, WordSet], WordSet | None]:
    """The one extraction a row's columns read (every column's kind, the union of their words and
    ``extra_words``), the word sets of the columns, and that union."""
    groups = word_groups(task)
    word_sets = {group: word_set(lm.tokenizer, words) for group, words in groups.items()}
    check_word_columns(columns, word_sets, lm.name)
    every_word = extraction_words(task, extra_words)
    union = word_set(lm.tokenizer, every_word) if every_word else None
    kinds = tuple(dict.fromkeys([*(FEATURE_COLUMNS[c][0] for c in columns),
                                 *(("word_log_probs",) if extra_words else ())])) or ("f",)
    return RowRequest(kinds, prompt, tuple(union.words) if union else None), word_sets, union


def row_features(lm, task: Task, texts: Sequence[str], columns: Sequence[str], prompt: str | None, config,
                 workdir: Path, extra_words: Sequence[str] = ()
                 ) -> tuple[dict[str, np.ndarray], dict[str, WordSet], dict]:
    """The feature matrix of every column for ``texts`` (+ ``prompt``), from one extraction (:func:`row_request`);
    the word sets; and the raw extraction (its metadata; with ``extra_words``, also their ``word_log_probs``, the
    union's columns)."""
    request, word_sets, union = row_request(lm, task, columns, prompt, extra_words)
    extracted = extract_features(lm, texts, request.kinds, words=request.words, prompt=prompt,
                                 options=extraction_options(config, workdir))
    return {c: column_features(extracted, c, word_sets, union) for c in columns}, word_sets, extracted
