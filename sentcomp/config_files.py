"""Loading experiment config files the way ``--config=experiments/X.py:arg`` does, for tests and sweeps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from sentcomp.errors import SentcompError

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def load_module(path: str | Path):
    """Imports a config file as a module."""
    path = Path(path)
    if not path.is_file():
        raise SentcompError(f"Config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"sentcomp_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"experiments/X.py:arg"`` -> ``get_config(arg)`` (``arg`` None when absent)."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise SentcompError(f"Config file {path} has no get_config(arg) function.")
    return module.get_config(arg or None)
