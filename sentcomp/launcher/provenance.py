"""What produced a run: one record per start of the run, appended to ``workdir/runs.jsonl``.

:func:`runner.run_program <sentcomp.launcher.runner.run_program>` calls :func:`record_start` right after it
wrote ``config.json`` (process 0 only), so the file holds the first start and every resume. A record
(:func:`collect`) holds:

* ``time``: when the run started, UTC ISO 8601 (e.g. ``"2026-11-04T09:12:33+00:00"``);
* ``argv``: the command line (``sys.argv``);
* ``python``: the Python version (e.g. ``"3.11.9"``);
* ``sentcomp``: the installed version of sentcomp (``importlib.metadata``; None when it is not installed);
* ``git_commit`` and ``git_dirty``: the commit checked out in the git work tree holding the sentcomp package
  (``git -C <package dir>``) and whether its tracked files differ from it (untracked files do not count,
  as in ``git describe --dirty``); both None when the package is not a tracked part of a git checkout (e.g.
  installed from a wheel) or git is missing or fails;
* ``packages``: the versions of :data:`PACKAGES` (None for one that is not installed);
* ``backend``, ``device_kind``, ``device_count``, ``process_count``: JAX's default backend, the kind of its
  first device (e.g. ``"TPU v4"``), the number of devices over all processes, and the number of processes.

When a resumed run's record differs from the previous start's in anything but ``time`` (another jax, another
commit, a dirty tree, other devices, another command line), a :class:`ProvenanceWarning` names each differing
key with its old and new value: the run's results then come from more than one setting.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import jax

from sentcomp.results import layout, storage

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "scikit-learn")
IGNORED_KEYS = ("time",)  # what may differ between two starts of one run without a warning
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the sentcomp package
GIT_TIMEOUT_SECONDS = 30


class ProvenanceWarning(UserWarning):
    """A resumed run starts in another setting (versions, code, devices, command) than its previous start."""


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(directory: Path, *args: str) -> str | None:
    """The stripped output of ``git -C directory args``, or None if git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_SECONDS, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(directory: Path = PACKAGE_DIR) -> dict[str, Any]:
    """``{"git_commit": HEAD's hash, "git_dirty": tracked files modified}`` of the git work tree holding
    ``directory``; both None unless ``directory/__init__.py`` is tracked there (a copy installed inside some other
    checkout, e.g. in its virtualenv, is not that checkout's code)."""
    commit = _git(directory, "rev-parse", "HEAD")
    if not commit or not _git(directory, "ls-files", "--", "__init__.py"):
        return {"git_commit": None, "git_dirty": None}
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def devices() -> dict[str, Any]:
    """JAX's default backend, the kind of its first device, the device count (all processes), the process count."""
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "process_count": jax.process_count()}


def collect() -> dict[str, Any]:
    """The record of this start (the keys are listed in the module's docstring)."""
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "python": platform.python_version(),
        "sentcomp": package_version("sentcomp"),
        **git_state(),
        "packages": {name: package_version(name) for name in PACKAGES},
        **devices(),
    }


def differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each (dotted, e.g. ``packages.jax``) key whose value differs between two
    records, except :data:`IGNORED_KEYS`."""
    old, new = storage.flatten(previous), storage.flatten(current)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if key not in IGNORED_KEYS and old.get(key) != new.get(key)]


def read_records(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of ``workdir/runs.jsonl``, oldest first (a line cut short by a crash is skipped)."""
    path = Path(workdir) / layout.RUNS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [record for record in records if isinstance(record, dict)]


def record_start(workdir: str | Path) -> dict[str, Any]:
    """Appends this start's record to ``workdir/runs.jsonl`` and returns it; warns (:class:`ProvenanceWarning`)
    when it differs from the previous start's record. Call it on process 0 only."""
    previous = read_records(workdir)
    record = collect()
    if previous and (changed := differences(previous[-1], record)):
        warnings.warn(f"{workdir} resumes a run that started in another setting ({previous[-1].get('time')}); "
                      f"what changed: {'; '.join(changed)}.", ProvenanceWarning, stacklevel=2)
    storage.append_json_line(Path(workdir) / layout.RUNS_FILE, record)
    return record
