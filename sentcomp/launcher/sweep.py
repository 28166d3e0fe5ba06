"""Sweep points, as config files write them: ``get_sweep()`` returns a list of ``{dotted config key: value}``
dicts, each applied on top of the base config (``get_config(arg)`` plus any ``--config.key=value`` overrides)::

    from sentcomp.launcher import sweep

    def get_sweep(arg=None):
        return sweep.product(
            sweep.axis("task", ["sst2", "agnews"]),
            sweep.zip(sweep.axis("probe.max_iter", [100, 200]), sweep.axis("seed", [0, 1])),
        )  # 4 points

Each point runs into ``DIR/<point_name(point)>/`` (:mod:`sentcomp.launcher.sweep_runner`). This module imports
neither JAX nor anything heavy, so config files load fast.
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
import re
from collections.abc import Iterable
from typing import Any

from sentcomp.errors import SentcompError

MAX_NAME_LENGTH = 100

Point = dict[str, Any]


def axis(key: str, values: Iterable[Any]) -> list[Point]:
    """One hyperparameter's values: ``axis("lr", [1, 2])`` -> ``[{"lr": 1}, {"lr": 2}]``."""
    return [{key: value} for value in values]


def _merge(points: tuple[Point, ...]) -> Point:
    merged: Point = {}
    for point in points:
        clash = merged.keys() & point.keys()
        if clash:
            raise SentcompError(f"Sweep combines the key(s) {sorted(clash)} twice; each key may vary in one part only.")
        merged.update(point)
    return merged


def product(*sweeps: list[Point]) -> list[Point]:
    """Every combination of the points of ``sweeps`` (the last one varies fastest)."""
    return [_merge(combination) for combination in itertools.product(*sweeps)]


def zip(*sweeps: list[Point]) -> list[Point]:  # noqa: A001 - read as sweep.zip in config files
    """The i-th points of ``sweeps`` merged together; all must have the same length."""
    lengths = {len(points) for points in sweeps}
    if len(lengths) > 1:
        raise SentcompError(f"sweep.zip needs parts of equal length, got lengths {[len(p) for p in sweeps]}.")
    return [_merge(combination) for combination in builtins.zip(*sweeps)]


def format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(item) for item in value)
    return repr(value) if isinstance(value, float) else str(value)


def point_name(point: Point) -> str:
    """A directory name for ``point``: ``{"lr": 0.001, "dim": 8}`` -> ``"lr=0.001,dim=8"`` (``"base"`` if empty).

    Characters outside ``[A-Za-z0-9._+=,-]`` become ``_``; a name over 100 characters is cut and suffixed with
    a hash of the full name so it stays unique.
    """
    name = ",".join(f"{key}={format_value(value)}" for key, value in point.items()) or "base"
    name = re.sub(r"[^A-Za-z0-9._+=,-]", "_", name)
    if len(name) > MAX_NAME_LENGTH:
        name = f"{name[: MAX_NAME_LENGTH - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def point_names(points: list[Point]) -> list[str]:
    """The names of ``points``, which must be distinct."""
    names = [point_name(point) for point in points]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SentcompError(f"The sweep lists the same point more than once: {duplicates}.")
    return names
