"""Where a task's files are in a Hugging Face Hub dataset repository (reading them is ``sentcomp.data.loaders``).

A Hub dataset is a git repository of data files. We read its files directly: ``huggingface_hub`` (a core
dependency) downloads a snapshot into its cache, ``~/.cache/huggingface/hub/datasets--OWNER--NAME/snapshots/
REVISION/`` (``$HF_HUB_CACHE``, or the ``cache_dir`` passed here), and the loaders read its JSON lines, CSV or
Parquet files (Parquet needs ``pyarrow``: ``pip install 'sentcomp[hub]'``). The ``datasets`` package is not
needed (docs/tasks.md says why).

A split's files are found by name, as the Hub does: every data file whose path relative to the snapshot has the
split's name as a whole word, delimited by ``/ - _ .`` or the ends (``train.jsonl``,
``data/train-00000-of-00001.parquet``, ``default/train/0000.parquet``); shards are read in name order.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

from sentcomp.errors import SentcompError

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


@dataclasses.dataclass(frozen=True, eq=False)
class HubSource:
    """A task's data in a Hub dataset repository ``repo_id`` at ``revision``: ``splits`` maps our split names
    to the names in the repository's file names (e.g. ``{"validation": "dev"}``), ``text_columns`` (joined with
    a space) and ``label_column`` name the fields."""

    repo_id: str
    splits: Mapping[str, str]
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    revision: str | None = None

    @property
    def download_command(self) -> str:
        revision = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id} --repo-type dataset{revision}"


def snapshot_dir(source: HubSource, cache_dir: str | Path | None = None, download: bool = False) -> Path:
    """The local snapshot of ``source``'s repository: from the Hub cache only (fails fast offline), or, with
    ``download=True``, fetched from the Hub when missing. A miss raises an error with the download command."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(
            source.repo_id, repo_type="dataset", revision=source.revision, cache_dir=cache_dir,
            local_files_only=not download, allow_patterns=[f"*{suffix}" for suffix in DATA_SUFFIXES],
        ))
    except Exception as error:  # no cache entry, offline, unknown repo, network: all mean "not here" to a user
        where = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        raise SentcompError(
            f"Cannot read the Hugging Face Hub dataset {source.repo_id} from the cache {where} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Download it once on a "
            f"machine with network: `{source.download_command}` (with `--cache-dir DIR`, pass data_dir=DIR and "
            "source='hub'), or pass download=True."
        ) from error


def split_pattern(split: str) -> re.Pattern:
    """Matches a relative file path naming ``split`` as a whole word (delimiters ``/ - _ .`` or the ends)."""
    return re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")


def split_files(snapshot: Path, source: HubSource) -> dict[str, list[Path]]:
    """``{our split: [its data files, in name order]}`` in ``snapshot``; an error names a split without files."""
    files = sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*")
                   if path.is_file() and path.suffix.lower() in DATA_SUFFIXES)
    found = {split: [snapshot / name for name in files if split_pattern(hub_split).search(name.rsplit(".", 1)[0])]
             for split, hub_split in source.splits.items()}
    missing = [source.splits[split] for split, paths in found.items() if not paths]
    if missing:
        raise SentcompError(
            f"The Hub dataset {source.repo_id} in {snapshot} has no data file named after split(s) {missing}; its data "
            f"files are {files[:20]}. Expected files named after each split, e.g. train.jsonl or "
            f"data/train-00000-of-00001.parquet; re-download it (`{source.download_command}`) or fix the task's "
            "hub splits."
        )
    return found
