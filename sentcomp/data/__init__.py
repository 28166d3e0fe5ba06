"""Downstream tasks: the registry (``tasks``), the readers (``loaders``), Hub datasets (``hub``) and offline
corpora."""

from sentcomp.data.hub import HubSource
from sentcomp.data.loaders import (
    Split,
    evaluation_splits,
    load_files,
    load_hub,
    load_task,
    load_tfds,
    read_csv,
    read_jsonl,
    read_parquet,
    read_pickles,
    read_tsv,
    repeated_splits,
    stratified_split,
)
from sentcomp.data.tasks import TASKS, Task, TfdsSource, get_task, register_task, task_from_config

__all__ = [
    "HubSource",
    "Split",
    "Task",
    "TfdsSource",
    "TASKS",
    "evaluation_splits",
    "get_task",
    "load_files",
    "load_hub",
    "load_task",
    "load_tfds",
    "read_csv",
    "read_jsonl",
    "read_parquet",
    "read_pickles",
    "read_tsv",
    "register_task",
    "repeated_splits",
    "stratified_split",
    "task_from_config",
]
