"""Config files and their validation: loading ``experiments/X.py:arg``, overrides, required fields, diffs.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict`` and optionally
``get_sweep(arg=None) -> list[dict]`` (the points of a hyperparameter sweep, see :mod:`sentcomp.launcher.sweep`).
``arg`` is the text after ``:`` in ``--config=experiments/X.py:arg``, a ``key=value,flag,...`` string that
:func:`parse_config_arg` reads. A field the user must set is declared with
``ml_collections.config_dict.placeholder(type)``; :func:`check_required` refuses to run while one is unset.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from sentcomp.errors import SentcompError
from sentcomp.results import storage

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
# config files that were merged into another one -> what runs the same checks now
MERGED_CONFIGS = {
    "kernel_check.py": "experiments/device_check.py:only=identities",
    "multihost_check.py": "experiments/device_check.py:only=multihost",
}


def load_module(path: str | Path):
    """Imports a config file as a module."""
    path = Path(path)
    if not path.is_file() and path.name in MERGED_CONFIGS:
        raise SentcompError(f"Config file {path} does not exist: its checks are now a group of the device check; "
                            f"run --config={MERGED_CONFIGS[path.name]} (add ,smoke for the smoke variant).")
    if not path.is_file():
        raise SentcompError(f"Config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"sentcomp_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SentcompError(f"Config file {path} is not a Python file: give a .py file that defines get_config.")
    module = importlib.util.module_from_spec(spec)
    with _reported(f"Config file {path}"):
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _reported(what: str):
    """Turns an exception raised by a config file's own code (a syntax or name error, a typo in ``get_config``)
    into one :class:`SentcompError` naming the file and line, instead of a traceback through the launcher."""
    try:
        yield
    except SentcompError:
        raise
    except Exception as error:
        if isinstance(error, SyntaxError):
            where = f"line {error.lineno}: {error.msg}"
        else:
            frames = [frame for frame in traceback.extract_tb(error.__traceback__)
                      if Path(frame.filename).name != Path(__file__).name]
            where = f"line {frames[-1].lineno} ({frames[-1].filename}): " if frames else ""
            where += f"{type(error).__name__}: {error}"
        raise SentcompError(f"{what} failed to load: {where}. Fix the config file.") from None


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"experiments/X.py:a=1,smoke"`` -> ``("experiments/X.py", "a=1,smoke")``; ``arg`` is None when absent."""
    path, _, arg = spec.partition(":")
    return path, arg or None


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"experiments/X.py:arg"`` -> ``get_config(arg)`` (``arg`` None when absent)."""
    path, arg = split_spec(spec)
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise SentcompError(f"Config file {path} has no get_config(arg) function.")
    config = _get_config(module, path, arg)
    check_args_kept(config, arg, path)
    check_no_argument_dropped(module, path, arg, config)
    return config


def _get_config(module, path: str, arg: str | None) -> ml_collections.ConfigDict:
    with _reported(f"{path}: get_config({arg!r})"):
        return module.get_config(arg)


def check_no_argument_dropped(module, path: str, arg: str | None, config: ml_collections.ConfigDict) -> None:
    """Every ``name=value`` of ``arg`` must have an effect: one that changes the config on its own (against
    ``get_config(None)``) but not within ``arg`` (against ``arg`` without it) was overridden by another argument,
    e.g. a variant (``smoke,size=medium``: smoke sets the model's shape), and the run would silently ignore it.
    The rule of every config file, applied when it is loaded."""
    items = [item.strip() for item in (arg or "").split(",") if "=" in item]
    if arg is None or not items:
        return
    plain = storage.flatten(to_plain(config))
    default = storage.flatten(to_plain(_get_config(module, path, None)))
    for item in items:
        rest = ",".join(other for other in arg.split(",") if other.strip() != item) or None
        try:
            alone = storage.flatten(to_plain(module.get_config(item)))
            without = storage.flatten(to_plain(module.get_config(rest)))
        except SentcompError:
            continue  # the arguments need each other: each has an effect
        decided = sorted(key for key in alone.keys() | default.keys() if alone.get(key) != default.get(key))
        if decided and plain == without:
            raise SentcompError(
                f"{path}:{arg}: the argument {item} has no effect here: another argument of the list sets every "
                f"field it decides ({', '.join(decided[:4])}{', ...' if len(decided) > 4 else ''}). Drop one of "
                "them, or set those fields after: --config.KEY=...")


def check_args_kept(config: ml_collections.ConfigDict, arg: str | None, path: str) -> None:
    """Every ``name=value`` of ``arg`` that names a top-level config field must have set it: a variant such as
    ``smoke`` that replaced an explicit value (``smoke,model=gpt2``) would run another experiment than asked."""
    for item in filter(None, (arg or "").split(",")):
        name, has_value, text = (part.strip() for part in item.partition("="))
        if not has_value or name not in config or isinstance(config[name], ml_collections.ConfigDict):
            continue
        try:
            asked = _parse_value(name, text, config[name])
        except SentcompError:
            continue
        if asked != config[name]:
            raise SentcompError(f"{path}:{arg}: {name}={text} was replaced by config.{name} = {config[name]!r} "
                                "(another argument of the list sets it). Drop one of them, or set it after: "
                                f"--config.{name}=...")


def keys_set_by_arguments(spec: str) -> dict[str, list[str]]:
    """For each ``name=value`` argument of ``"experiments/X.py:arg"``: the dotted config keys whose value it
    decides (those that differ when the argument is left out), e.g. ``{"loss=quad": ["loss", ...]}``."""
    path, arg = split_spec(spec)
    items = [item for item in (arg or "").split(",") if "=" in item]
    full = storage.flatten(to_plain(load_config(spec)))
    decided = {}
    for item in items:
        rest = ",".join(other for other in (arg or "").split(",") if other != item)
        without = storage.flatten(to_plain(load_config(f"{path}:{rest}" if rest else path)))
        decided[item.strip()] = sorted(key for key in full.keys() | without.keys() if full.get(key) != without.get(key))
    return decided


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """The sweep points of ``"experiments/X.py:arg"``: ``get_sweep(arg)`` (or ``get_sweep()`` if it takes none)."""
    path, arg = split_spec(spec)
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise SentcompError(f"Config file {path} defines no get_sweep(): it has nothing to sweep over.")
    takes_arg = bool(inspect.signature(module.get_sweep).parameters)
    with _reported(f"{path}: get_sweep({arg!r})"):
        points = module.get_sweep(arg) if takes_arg else module.get_sweep()
    if not points or not all(isinstance(point, Mapping) for point in points):
        raise SentcompError(f"{path}: get_sweep() must return a non-empty list of {{config key: value}} dicts.")
    return [dict(point) for point in points]


def _parse_value(name: str, text: str, default: Any) -> Any:
    """``text`` read as the type of ``default`` (a string when the default is None or a string)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SentcompError(f"Config argument {name}={text!r}: expected true or false.")
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise SentcompError(f"Config argument {name}={text!r}: expected {type(default).__name__}.") from None
    return text


def parse_config_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Reads a config file's ``arg`` (``"task=sst2,smoke"``) against ``defaults`` (``task="sst2", smoke=False``).

    A bare name is a flag set to True. Each value takes the type of its default. An unknown name raises
    :class:`SentcompError` listing the accepted ones.
    """
    parsed = ConfigArguments(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, has_value, text = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise SentcompError(f"Unknown config argument {name!r}; this config accepts: {', '.join(defaults)}.")
        parsed[name] = _parse_value(name, text.strip(), defaults[name]) if has_value else True
    parsed.freeze_given(arg)
    return parsed


class ConfigArguments(ml_collections.ConfigDict):
    """The arguments :func:`parse_config_arg` read. Those given explicitly (``name=value``) cannot be set to
    another value afterwards: a variant that would (``smoke`` setting ``corpus = "lee"`` over ``corpus=enwiki``)
    raises :class:`SentcompError` instead of silently running another experiment than asked."""

    def freeze_given(self, arg: str | None) -> None:
        given = {item.partition("=")[0].strip(): item.strip() for item in (arg or "").split(",") if "=" in item}
        object.__setattr__(self, "_given", given)

    def __setitem__(self, key, value):
        given = self.__dict__.get("_given", {})
        if key in given and value != self[key]:
            raise SentcompError(f"The config argument {given[key]} was replaced by {key}={value!r} (another argument "
                                "of the list, e.g. a variant such as smoke, sets it). Drop one of them.")
        super().__setitem__(key, value)


def _walk_to_parent(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding the dotted ``key``, and the key's last part; unknown parts raise SentcompError."""
    parent, path = config, "config"
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
            if not isinstance(parent, ml_collections.ConfigDict):
                raise SentcompError(f"Unknown config key {key!r}: {path} is a value, not a group of fields.")
            choices = ", ".join(sorted(parent.keys()))
            raise SentcompError(f"Unknown config key {key!r}: {path} has no field {part!r}. Valid keys: {choices}.")
        if depth < len(parts) - 1:
            parent, path = parent[part], f"{path}.{part}"
    return parent, parts[-1]


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises SentcompError naming ``key`` and the valid choices if the dotted ``key`` is not in ``config``."""
    _walk_to_parent(config, key)


def linked_groups(config: ml_collections.ConfigDict, prefix: str = "",
                  groups: dict[int, list[str]] | None = None) -> list[list[str]]:
    """The dotted keys of ``config`` that share one ``FieldReference`` (``b = config.get_ref("a")`` links ``b`` to
    ``a``: setting either sets both), as groups of two or more, each shallowest key first (the shared setting)."""
    groups = {} if groups is None else groups
    for key, value in config.items(preserve_field_references=True):
        if isinstance(value, config_dict.FieldReference):
            groups.setdefault(id(value), []).append(f"{prefix}{key}")
        elif isinstance(value, ml_collections.ConfigDict):
            linked_groups(value, f"{prefix}{key}.", groups)
    if prefix:
        return []
    return [sorted(keys, key=lambda name: name.count(".")) for keys in groups.values() if len(keys) > 1]


def check_unlinked_override(config: ml_collections.ConfigDict, key: str) -> None:
    """An override of a field linked to a shared setting (:func:`linked_groups`) would write through the link and
    change every field of the group, e.g. both arms of an experiment: refused, naming the shared key to set."""
    for group in linked_groups(config):
        if key in group[1:]:
            others = ", ".join(name for name in group if name != key)
            raise SentcompError(
                f"--config.{key} is linked to config.{group[0]} (shared with {others}): setting it would change "
                f"every one of them. Set --config.{group[0]}=... to change them all; to change {key} alone, edit "
                "the config file.")


def override(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the dotted keys of ``values`` set, e.g. ``{"model.dim": 64}``.

    Keys must already exist and values must fit the field's type (ConfigDict's own type rules: an int may
    set a float field, nothing else converts); otherwise :class:`SentcompError` names the key.
    """
    config = copy.deepcopy(config)
    for key, value in values.items():
        parent, leaf = _walk_to_parent(config, key)
        try:
            parent[leaf] = value
        except TypeError as error:
            raise SentcompError(f"config.{key} = {value!r} has the wrong type: {error}") from None
    return config


def missing_required(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted keys of the placeholders (``config_dict.placeholder(type)``) that are still unset."""
    missing = []
    for key, value in config.items(preserve_field_references=True):
        if isinstance(value, config_dict.FieldReference) and value.get() is None:
            missing.append(f"{prefix}{key}")
        elif isinstance(value, ml_collections.ConfigDict):
            missing.extend(missing_required(value, f"{prefix}{key}."))
    return missing


def check_required(config: ml_collections.ConfigDict) -> None:
    """Raises SentcompError naming every required field (placeholder) the user has not set."""
    missing = missing_required(config)
    if missing:
        fields = ", ".join(missing)
        example = " ".join(f"--config.{key}=..." for key in missing)
        raise SentcompError(f"Required config field(s) not set: {fields}. Set them, e.g. {example}.")


def to_plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as it is saved in ``config.json`` (JSON types: tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Lines ``key: old -> new`` for the dotted keys that differ between two plain configs, except ``ignore`` (and
    the keys under them)."""
    old_flat, new_flat = storage.flatten(old), storage.flatten(new)
    lines = []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if storage.is_under(key, ignore):
            continue
        before, after = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if before != after:
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines
