"""Reading a task's labeled texts: TFDS (without TensorFlow), the Hugging Face Hub, local files, or a built-in
offline corpus.

Every reader returns a :class:`Split` (``texts: list[str]``, ``labels: int64 [N]``) and validates each example:
a missing column, an unknown label or an empty text raises a :class:`~sentcomp.errors.SentcompError` naming
the file and line (or pickle entry / TFDS example).

Local file formats (the formats the authors' data comes in, plus two common ones):

* ``sentence<TAB>label`` TSV (``.tsv``/``.txt``): split at the last tab; a first line whose label field is
  ``label`` is a header and skipped; blank lines are skipped.
* CSV (``.csv``) with a header naming the task's ``text_columns`` and ``label_column``.
* JSON lines (``.jsonl``/``.json``): one object per line with the same fields.
* Parquet (``.parquet``, the Hub's format; needs ``pyarrow``: ``pip install 'sentcomp[hub]'``) with the same
  columns.
* The authors' pickled lists: ``tr_inp.pkl``/``tr_labels.pkl`` (train) and ``te_inp.pkl``/``te_labels.pkl``
  (test). Unpickling runs code stored in the file: load only pickles you trust.

A label is a class index ``0..K-1`` (int or digit string) or a class name from ``task.label_names``.

Where ``load_task`` looks for files when ``task.files`` is not set: in ``data_dir/<task name>``,
``data_dir/<each of task.file_dirs>``, then ``data_dir`` itself, for each split ``<split>.tsv``,
``<split>.csv``, ``<split>.jsonl`` or the authors' pickles.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import numbers
import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sentcomp.data import hub
from sentcomp.data.tasks import Task, TfdsSource, get_task
from sentcomp.errors import SentcompError

SOURCES = ("auto", "files", "hub", "tfds", "builtin")
SPLIT_FILE_SUFFIXES = (".tsv", ".csv", ".jsonl")
AUTHORS_PICKLE_PREFIXES = {"train": "tr", "test": "te"}


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Labeled texts: ``texts[i]`` has class index ``labels[i]``."""

    texts: list[str]
    labels: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        if len(self.texts) != len(self.labels):
            raise SentcompError(f"A split has {len(self.texts)} texts but {len(self.labels)} labels.")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Sequence[int] | np.ndarray) -> Split:
        """The examples at ``indices``, in that order."""
        index_array = np.asarray(indices, dtype=np.int64)
        return Split([self.texts[i] for i in index_array], self.labels[index_array])

    @staticmethod
    def concatenate(splits: Iterable[Split]) -> Split:
        splits = list(splits)
        return Split([text for split in splits for text in split.texts],
                     np.concatenate([split.labels for split in splits]))


# ----------------------------------------------------------------------------------------------------------
# Validating one example


def parse_label(raw: Any, label_names: Sequence[str], where: str) -> int:
    """The class index of ``raw``: an index ``0..K-1`` (int, integral float or digit string) or a label name."""
    if isinstance(raw, (np.ndarray, np.generic)) and np.ndim(raw) == 0:  # TFDS gives 0-d arrays
        raw = raw.item()
    value = raw
    if isinstance(raw, str):
        name = raw.strip()
        if name in label_names:
            return list(label_names).index(name)
        value = int(name) if name.lstrip("-").isdigit() else None
    is_index = not isinstance(value, (bool, np.bool_)) and (
        isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer())
    )
    if is_index and 0 <= int(value) < len(label_names):
        return int(value)
    raise SentcompError(
        f"{where}: unknown label {raw!r}; expected a class index 0..{len(label_names) - 1} or one of "
        f"{list(label_names)}."
    )


def check_text(text: Any, where: str) -> str:
    """``text`` as a non-blank ``str`` (bytes are decoded as UTF-8)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not isinstance(text, str):
        raise SentcompError(f"{where}: the text is a {type(text).__name__}, expected a string.")
    if not text.strip():
        raise SentcompError(f"{where}: empty text; remove the example or fill in its text.")
    return text


def build_split(examples: Iterable[tuple[Any, Any, str]], label_names: Sequence[str], source: str) -> Split:
    """A split from ``(text, raw_label, where)`` triples, each validated; an empty source is an error."""
    texts, labels = [], []
    for text, raw_label, where in examples:
        texts.append(check_text(text, where))
        labels.append(parse_label(raw_label, label_names, where))
    if not texts:
        raise SentcompError(f"{source} holds no examples.")
    return Split(texts, np.asarray(labels, np.int64))


# ----------------------------------------------------------------------------------------------------------
# Local files


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file (a leading BOM dropped); bytes that are not UTF-8 raise :class:`SentcompError`
    naming the line (1-based) and column where they are, which a user can open, rather than a byte offset."""
    path = Path(path)
    if not path.is_file():
        raise SentcompError(f"Data file {path} does not exist.")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise SentcompError(f"{path} is not UTF-8 text at line {line}, column {column} (byte "
                            f"{data[error.start:error.start + 1]!r}, {error.reason}). Re-save the file as UTF-8, "
                            "e.g. `iconv -f latin1 -t utf-8`.") from None


def _read_lines(path: Path, keepends: bool = False) -> list[str]:
    """The file's lines, split at ``\\n``, ``\\r\\n`` and ``\\r`` only: ``str.splitlines`` also splits at U+2028,
    U+0085, form feeds, ..., which are text inside a JSONL or TSV record."""
    lines = list(io.StringIO(read_utf8(path), newline=""))
    return lines if keepends else [line.rstrip("\r\n") for line in lines]


def _non_blank_lines(path: Path):
    """``(line number, "FILE, line N", line)`` for every non-blank line of a text file."""
    for number, line in enumerate(_read_lines(path), start=1):
        if line.strip():
            yield number, f"{path}, line {number}", line


def read_tsv(path: str | Path, label_names: Sequence[str]) -> Split:
    """A ``sentence<TAB>label`` file (split at the last tab; optional ``sentence<TAB>label`` header)."""
    path = Path(path)

    def examples():
        for number, where, line in _non_blank_lines(path):
            if "\t" not in line:
                raise SentcompError(f"{where}: missing label column; expected 'sentence<TAB>label'.")
            text, label = line.rsplit("\t", 1)
            if number == 1 and label.strip().lower() == "label":
                continue
            yield text, label, where

    return build_split(examples(), label_names, str(path))


def _record_example(record: dict, text_columns: Sequence[str], label_column: str, where: str) -> tuple[str, Any]:
    """The text (columns joined with a space) and raw label of one CSV row / JSON object."""
    missing = [column for column in (*text_columns, label_column) if record.get(column) is None]
    if missing:
        raise SentcompError(f"{where}: missing column(s) {missing}; the record has {sorted(record)}.")
    parts = [record[column] for column in text_columns]
    if not all(isinstance(part, str) for part in parts):
        raise SentcompError(f"{where}: text column(s) {list(text_columns)} must hold strings.")
    return " ".join(part.strip() for part in parts), record[label_column]


def _is_record(line: str, header: Sequence[str], label_column: str, label_names: Sequence[str]) -> bool:
    """Whether one CSV ``line`` alone is a whole record: as many fields as the header, a valid label."""
    fields = next(csv.reader([line]), [])
    if len(fields) != len(header):
        return False
    try:
        parse_label(fields[list(header).index(label_column)], label_names, "")
    except SentcompError:
        return False
    return True


def _check_no_merged_records(lines: Sequence[str], is_record, where: str) -> None:
    """A CSV record that spans several physical ``lines`` (a quoted field holding line breaks) must not hold
    inner lines that are whole records by themselves (``is_record``), nor start with a line that is one once its
    opening quote is dropped (a quote closed on the next line instead of this one): that is the mark of an
    unbalanced quote, which silently merges the records up to the next quote into one text. Raises
    :class:`SentcompError`."""
    opening = [lines[0].replace('"', "", 1)] if len(lines) > 1 else []
    if any(is_record(line.rstrip("\r\n")) for line in [*opening, *lines[1:-1]]):
        raise SentcompError(f"{where}: one quoted field runs over {len(lines)} lines, and some of them look like "
                            "whole records: an unbalanced quote is merging records. Close the quote, or double "
                            'a quote that belongs to the text ("").')


def read_csv(path: str | Path, label_names: Sequence[str], text_columns: Sequence[str] = ("text",),
             label_column: str = "label") -> Split:
    """A CSV file with a header naming ``text_columns`` (joined with a space) and ``label_column``."""
    path = Path(path)
    lines = _read_lines(path, keepends=True)  # line ends kept for quoted newlines
    reader = csv.DictReader(lines, strict=True)
    try:
        header = reader.fieldnames or []
    except csv.Error as error:
        raise SentcompError(f"{path}, line 1: malformed CSV header ({error}).") from None
    missing = [column for column in (*text_columns, label_column) if column not in header]
    if missing:
        raise SentcompError(
            f"{path}, line 1: missing column(s) {missing} in the header {header}; expected columns "
            f"{[*text_columns, label_column]} (set the task's text_columns/label_column to match the file)."
        )

    def examples():
        first = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise SentcompError(f"{path}, line {first}: malformed CSV ({error}); a field that starts with a "
                                    'quote must end with one, and a quote inside it is doubled ("").') from None
            where = f"{path}, line {first}"
            _check_no_merged_records(lines[first - 1:reader.line_num],
                                     lambda line: _is_record(line, header, label_column, label_names), where)
            yield (*_record_example(row, text_columns, label_column, where), where)
            first = reader.line_num + 1

    return build_split(examples(), label_names, str(path))


def read_jsonl(path: str | Path, label_names: Sequence[str], text_columns: Sequence[str] = ("text",),
               label_column: str = "label") -> Split:
    """A JSON lines file: one object per line with ``text_columns`` and ``label_column``."""
    path = Path(path)

    def examples():
        for _, where, line in _non_blank_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SentcompError(f"{where}: not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict):
                raise SentcompError(
                    f"{where}: expected one JSON object per line (JSON lines), got a {type(record).__name__}."
                )
            yield (*_record_example(record, text_columns, label_column, where), where)

    return build_split(examples(), label_names, str(path))


def read_parquet(path: str | Path, label_names: Sequence[str], text_columns: Sequence[str] = ("text",),
                 label_column: str = "label") -> Split:
    """A Parquet file with columns ``text_columns`` (joined with a space) and ``label_column``."""
    path = Path(path)
    try:
        import pyarrow.parquet
    except ImportError:
        raise SentcompError(f"Reading {path} needs pyarrow: pip install 'sentcomp[hub]'.") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise SentcompError(f"{path} is not a readable Parquet file ({error}).") from None
    missing = [column for column in (*text_columns, label_column) if column not in table.column_names]
    if missing:
        raise SentcompError(
            f"{path}: missing column(s) {missing}; the file has {table.column_names} (set the task's text/label "
            "columns to match it)."
        )
    examples = ((*_record_example(record, text_columns, label_column, f"{path}, row {index}"), f"{path}, row {index}")
                for index, record in enumerate(table.select([*text_columns, label_column]).to_pylist()))
    return build_split(examples, label_names, str(path))


def _unpickle_list(path: Path) -> list:
    if not path.is_file():
        raise SentcompError(f"Data file {path} does not exist.")
    with path.open("rb") as file:
        try:
            values = pickle.load(file)
        except Exception as error:  # a corrupt pickle can raise nearly anything
            raise SentcompError(f"{path} is not a readable pickle ({type(error).__name__}: {error}).") from None
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise SentcompError(f"{path} holds a {type(values).__name__}; expected a list.")
    return list(values)


def read_pickles(texts_path: str | Path, labels_path: str | Path, label_names: Sequence[str]) -> Split:
    """The authors' format: a pickled list of texts and a pickled list of labels of the same length."""
    texts_path, labels_path = Path(texts_path), Path(labels_path)
    texts, labels = _unpickle_list(texts_path), _unpickle_list(labels_path)
    if len(texts) != len(labels):
        raise SentcompError(f"{texts_path} has {len(texts)} texts but {labels_path} has {len(labels)} labels.")
    examples = ((text, label, f"{texts_path} / {labels_path}, entry {index}")
                for index, (text, label) in enumerate(zip(texts, labels)))
    return build_split(examples, label_names, str(texts_path))


def read_data_file(path: str | Path, label_names: Sequence[str], text_columns: Sequence[str] = ("text",),
                   label_column: str = "label") -> Split:
    """One data file, its format by suffix: ``.tsv``/``.txt``, ``.csv``, ``.jsonl``/``.json`` or ``.parquet``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt"):
        return read_tsv(path, label_names)
    readers = {".csv": read_csv, ".jsonl": read_jsonl, ".json": read_jsonl, ".parquet": read_parquet}
    if suffix not in readers:
        raise SentcompError(
            f"{path}: unknown data file type {suffix!r}; use .tsv (sentence<TAB>label), .csv, .jsonl, .parquet, "
            "or a [texts.pkl, labels.pkl] pair."
        )
    return readers[suffix](path, label_names, text_columns, label_column)


def read_split_file(file: Any, task: Task) -> Split:
    """One split from a file path (format by suffix) or a ``(texts.pkl, labels.pkl)`` pair."""
    if isinstance(file, (list, tuple)):
        if len(file) != 2:
            raise SentcompError(f"Task {task.name!r}: a pickled split is a [texts.pkl, labels.pkl] pair, got {file}.")
        return read_pickles(file[0], file[1], task.label_names)
    return read_data_file(file, task.label_names, task.text_columns, task.label_column)


def _split_file_in(folder: Path, split: str):
    """The file (or authors' pickle pair) holding ``split`` in ``folder``, or None."""
    prefix = AUTHORS_PICKLE_PREFIXES.get(split)
    if prefix and (folder / f"{prefix}_inp.pkl").is_file():
        return folder / f"{prefix}_inp.pkl", folder / f"{prefix}_labels.pkl"
    for suffix in SPLIT_FILE_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def find_split_files(task: Task, data_dir: str | Path) -> dict[str, Any] | None:
    """``{split: file}`` for the first folder under ``data_dir`` holding the task's files (see module doc).

    None if no folder holds any; an error if a folder holds some splits but not all.
    """
    data_dir = Path(data_dir)
    for folder in [data_dir / name for name in (task.name, *task.file_dirs)] + [data_dir]:
        if not folder.is_dir():
            continue
        found = {split: _split_file_in(folder, split) for split in task.splits}
        missing = [split for split, file in found.items() if file is None]
        if len(missing) < len(found):
            if missing:
                raise SentcompError(
                    f"{folder} has files for task {task.name!r} but none for split(s) {missing}; expected "
                    f"{' or '.join(f'<split>{suffix}' for suffix in SPLIT_FILE_SUFFIXES)} or the authors' pickles."
                )
            return found
    return None


def load_files(task: Task | str, data_dir: str | Path | None = None) -> dict[str, Split]:
    """The task's splits from local files: ``task.files`` (relative to ``data_dir``) or found in ``data_dir``."""
    task = get_task(task)
    files: dict[str, Any] | None  # {split: its file, its files, or the authors' pickle pair}
    if task.files:
        base = Path(data_dir) if data_dir is not None else Path()
        files = {split: ([base / part for part in file] if isinstance(file, (list, tuple)) else base / file)
                 for split, file in task.files.items()}
    else:
        files = find_split_files(task, data_dir) if data_dir is not None else None
        if files is None:
            where = f"in {data_dir} (or its subfolders {[task.name, *task.file_dirs]})" if data_dir else \
                "because no data_dir was given"
            hub_hint = (f" {data_dir} holds the task's Hugging Face Hub dataset: load it with source='hub' "
                        "(config.data_source='hub')." if task.hub is not None and data_dir is not None
                        and _hub_cached(task.hub, data_dir) else "")
            raise SentcompError(
                f"No data files for task {task.name!r} {where}: expected, for each split {list(task.splits)}, "
                f"<split>.tsv (sentence<TAB>label), <split>.csv or <split>.jsonl, or the authors' "
                f"tr_inp.pkl/tr_labels.pkl and te_inp.pkl/te_labels.pkl.{hub_hint}"
            )
    return {split: read_split_file(file, task) for split, file in files.items()}


# ----------------------------------------------------------------------------------------------------------
# TFDS (no TensorFlow needed: tfds.data_source reads array_record files)


def _import_tfds(dataset_name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise SentcompError(
            "Reading TFDS datasets needs tensorflow-datasets: pip install 'sentcomp[tfds]' (TensorFlow itself "
            "is not needed)."
        ) from None
    if dataset_name.split("/")[0] == "glue":
        # Without TensorFlow, the legacy glue builder is registered only once its module is imported.
        importlib.import_module("tensorflow_datasets.text.glue")
    return tfds


def load_tfds(task: Task | str, data_dir: str | Path | None = None, download: bool = False) -> dict[str, Split]:
    """The task's splits from TFDS via ``tfds.data_source`` (array_record; TensorFlow not needed).

    ``data_dir`` defaults to TFDS's (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). With ``download=False``
    the dataset must already be prepared there in array_record format.
    """
    task = get_task(task)
    if task.tfds is None:
        raise SentcompError(f"Task {task.name!r} is not in TFDS; load it from files (source='files').")
    tfds = _import_tfds(task.tfds.name)
    splits = {}
    for split, tfds_split in task.tfds.splits.items():
        name = f"TFDS {task.tfds.name}[{tfds_split}]"
        try:
            source = tfds.data_source(task.tfds.name, split=tfds_split, data_dir=data_dir, download=download)
        except Exception as error:  # TFDS raises many types for "not prepared here"; all mean the same to users
            raise SentcompError(
                f"Cannot read {name} from TFDS data_dir {data_dir or '(default)'}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}. Prepare it in array_record format on a machine "
                f"with network (tfds build {task.tfds.name} --file_format=array_record), pass download=True, or "
                "load the task from local files (source='files')."
            ) from error
        examples = (
            (_tfds_text(record, task.tfds.text_keys, f"{name}, example {index}"), record.get(task.tfds.label_key),
             f"{name}, example {index}")
            for index, record in ((index, source[index]) for index in range(len(source)))
        )
        splits[split] = build_split(examples, task.label_names, name)
    return splits


def _tfds_text(record: dict, text_keys: Sequence[str], where: str) -> str:
    missing = [key for key in text_keys if key not in record]
    if missing:
        raise SentcompError(f"{where}: missing feature(s) {missing}; the example has {sorted(record)}.")
    parts = [record[key].decode("utf-8") if isinstance(record[key], bytes) else str(record[key]) for key in text_keys]
    return " ".join(part.strip() for part in parts)


# ----------------------------------------------------------------------------------------------------------
# The Hugging Face Hub (files read directly from the hub cache; no ``datasets`` package)


def load_hub(task: Task | str, cache_dir: str | Path | None = None, download: bool = False) -> dict[str, Split]:
    """The task's splits from its Hub dataset (``task.hub``), every split its source names (e.g. also
    ``validation``).

    ``cache_dir`` defaults to the Hub's cache (``$HF_HUB_CACHE``, ``~/.cache/huggingface/hub``). With
    ``download=False`` the dataset must already be there (``hf download REPO --repo-type dataset``); nothing
    is fetched, so an offline miss fails at once with that command in the error.
    """
    task = get_task(task)
    if task.hub is None:
        raise SentcompError(f"Task {task.name!r} has no Hugging Face Hub source; use source='files' or 'tfds'.")
    source = task.hub
    files = hub.split_files(hub.snapshot_dir(source, cache_dir, download), source)
    return {split: Split.concatenate(read_data_file(path, task.label_names, source.text_columns, source.label_column)
                                     for path in paths)
            for split, paths in files.items()}


def _holds_tfds(source: TfdsSource, data_dir) -> bool:
    """Whether ``data_dir`` has a folder of the task's TFDS dataset (``<data_dir>/<name>/``): else a data_dir
    given for files is not read as a TFDS directory (whose error would not say what the folder lacks)."""
    return (Path(data_dir).expanduser() / source.name.split("/")[0].split(":")[0]).is_dir()


def _hub_cached(source: hub.HubSource, cache_dir) -> bool:
    """Whether the task's Hub dataset is in the local cache (checked without any network access)."""
    try:
        hub.snapshot_dir(source, cache_dir, download=False)
    except SentcompError:
        return False
    return True


def _refuse_different_tfds_split(task: Task, tfds: TfdsSource) -> None:
    """``source="auto"`` falls back to TFDS (``tfds``, the task's) only where TFDS holds the task's own split: where
    it does not (``tfds.differs``, e.g. SST-2's GLUE copy), an error names both sources and how to get either."""
    if tfds.differs and task.hub is not None:
        raise SentcompError(
            f"Task {task.name!r}: its Hugging Face Hub dataset {task.hub.repo_id} (the paper's split) is not in the "
            f"local Hub cache, and the TFDS copy {tfds.name} is a different split ({tfds.differs}), so "
            f"nothing is loaded. Download the Hub copy once: `{task.hub.download_command}` (or pass download=True), "
            "or ask for the TFDS copy explicitly with source='tfds' (data_source='tfds' in a config)."
        )


# ----------------------------------------------------------------------------------------------------------
# One entry point


def load_builtin(task: Task | str) -> dict[str, Split]:
    """The splits of a task whose data ships offline (``task.builtin = "module:function"``)."""
    task = get_task(task)
    if not task.builtin:
        raise SentcompError(f"Task {task.name!r} has no built-in data; use source='files' or 'tfds'.")
    module, _, function = task.builtin.partition(":")
    return getattr(importlib.import_module(module), function)()


def load_task(task: Task | str, data_dir: str | Path | None = None, source: str = "auto",
              download: bool = False) -> dict[str, Split]:
    """A task's labeled splits, ``{split name: Split}``.

    ``source``: ``"files"`` (``task.files`` or files found in ``data_dir``), ``"hub"`` (``data_dir`` is the Hub
    cache dir, default the Hub's; ``download`` lets it fetch the dataset), ``"tfds"`` (``data_dir`` is the TFDS
    data dir; ``download`` lets TFDS fetch and prepare it), ``"builtin"`` (offline corpora), or ``"auto"``:
    built-in data if the task has it, else local files if ``task.files`` is set or ``data_dir`` holds them,
    else the Hub if the task is there and its dataset is in ``data_dir`` read as a Hub cache or in the default
    Hub cache (or ``download``), else TFDS if the task is there (with a ``data_dir``: if it has the dataset's
    TFDS folder) and TFDS holds the same split (SST-2's GLUE copy does not: an error then names both sources;
    ask for it with ``source="tfds"``); otherwise the error says which files ``data_dir`` should hold or,
    without a ``data_dir``, the Hub download command.
    """
    task = get_task(task)
    if source not in SOURCES:
        raise SentcompError(f"Unknown data source {source!r}; expected one of {list(SOURCES)}.")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise SentcompError(f"data_dir {str(data_dir)!r} is not a directory: pass the folder holding the task's "
                            "files (or TFDS / Hub data), or none for the built-in data and the default caches.")
    if source == "auto":
        if task.builtin:
            source = "builtin"
        elif task.files or (data_dir is not None and find_split_files(task, data_dir) is not None):
            source = "files"
        elif task.hub is not None and data_dir is not None and _hub_cached(task.hub, data_dir):
            source = "hub"  # data_dir is a Hub cache holding the task's dataset
        elif task.hub is not None and (download or _hub_cached(task.hub, None)):
            source, data_dir = "hub", None
        elif task.tfds is not None and (data_dir is None or _holds_tfds(task.tfds, data_dir)):
            _refuse_different_tfds_split(task, task.tfds)
            source = "tfds"
        else:
            # raises the error saying what is expected: files if a data_dir was given, else the Hub's download command
            source = "files" if data_dir is not None or task.hub is None else "hub"
    if source == "builtin":
        return load_builtin(task)
    if source == "hub":
        return load_hub(task, data_dir, download=download)
    if source == "tfds":
        return load_tfds(task, data_dir, download=download)
    return load_files(task, data_dir)


# ----------------------------------------------------------------------------------------------------------
# Train/test pairs for evaluation


def repeated_splits(texts: Sequence[str], labels: Sequence[int] | np.ndarray, n: int = 10, test_fraction: float = 0.1,
                    seed: int = 0) -> list[tuple[Split, Split]]:
    """``n`` random (train, test) splits of the pooled data, test = ``round(N·test_fraction)`` examples.

    The paper's protocol for tasks without an official split (MPQA, CR): 10 random 90/10 splits, accuracies
    averaged. Unlike the authors' code the permutations are seeded: repeat ``i`` uses the ``i``-th permutation
    drawn from ``numpy.random.default_rng(seed)``.
    """
    pooled = Split(list(texts), np.asarray(labels))
    size = len(pooled)
    n_test = int(round(size * test_fraction))
    if not 0 < n_test < size:
        raise SentcompError(
            f"Cannot make a {test_fraction:.0%} test split of {size} examples: both sides need an example."
        )
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        order = rng.permutation(size)
        pairs.append((pooled.take(order[n_test:]), pooled.take(order[:n_test])))
    return pairs


def evaluation_splits(task: Task | str, splits: dict[str, Split], n_repeats: int = 10,
                      test_fraction: float = 0.1, seed: int = 0) -> list[tuple[Split, Split]]:
    """The (train, test) pairs a task is evaluated on: its official pair, or for tasks without an official
    split (``task.official_split`` False) ``repeated_splits`` of all its splits pooled."""
    task = get_task(task)
    if task.official_split:
        if "train" not in splits or "test" not in splits:
            raise SentcompError(f"Task {task.name!r} needs 'train' and 'test' splits, got {sorted(splits)}.")
        return [(splits["train"], splits["test"])]
    pooled = Split.concatenate(splits.values())
    return repeated_splits(pooled.texts, pooled.labels, n_repeats, test_fraction, seed)


def stratified_split(split: Split, test_fraction: float, seed: int) -> tuple[Split, Split]:
    """A seeded (train, test) split keeping each class's share: class ``c`` (in index order) sends
    ``round(n_c·test_fraction)`` of its examples, chosen by ``default_rng(seed).permutation``, to test.
    Both sides keep the original example order."""
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        test.extend(rng.permutation(members)[: int(round(len(members) * test_fraction))])
    is_test = np.zeros(len(split), bool)
    is_test[test] = True
    return split.take(np.flatnonzero(~is_test)), split.take(np.flatnonzero(is_test))
