"""Composed configs: one experiment made of several program runs (*stages*), each in ``WORKDIR/<stage>/``.

A **composed config** has no ``program`` of its own; instead

* ``config.stages``: a group of stage name -> a full program config (with its own ``program``, validated and run
  exactly as if launched alone, :func:`sentcomp.launcher.runner.run_program`);
* ``config.stage_order``: every stage name once, in the order the stages run (``ml_collections`` does not keep
  a group's insertion order through copies, so the order is written out).

**Stage references.** A string value anywhere in a stage's config (nested groups, tuples and lists included) of
the form ``"stage:NAME"`` or ``"stage:NAME/relative/path"`` stands for the absolute path ``WORKDIR/NAME`` (or
``WORKDIR/NAME/relative/path``); it is replaced before the stage is validated or run (the stage's own
``config.json`` records the reference as written, so a moved experiment still matches it). ``NAME`` must be a
stage that runs *earlier*. Example: a Table-1 stage with
``model = "stage:pretrain_xent"`` evaluates the model that stage saved (:func:`sentcomp.models.load` takes a
training run's workdir).

**Running** (the runner's job): every stage is resolved and validated (program importable, required fields
set, the program's ``check_config``, a stage workdir that already holds a run recorded with the same config)
before the first one runs (an error naming an earlier stage's output, not written yet, waits until the stage
starts: :func:`reference_targets`); then
each stage without ``WORKDIR/NAME/done.json`` runs, in order. A killed composed run therefore resumes where it
stopped: finished stages are skipped, the interrupted one resumes from what its own workdir holds. The composed
run's headline (its ``done.json``) is its last stage's.

**Shared settings.** A stage field linked to a top-level field with ``config.get_ref("name")`` follows it, so a
sweep point (or ``--config.name=value``) that sets ``name`` changes every linked stage at once: a sweep point is a
whole composed experiment, run into ``SWEEP_DIR/<point>/<stage>/``. ``--config.<linked stage field>=value``
would write through the link too: the command line refuses it, naming the shared key
(:func:`sentcomp.launcher.config_files.check_unlinked_override`).

This module imports neither JAX nor any program; it only reads and rewrites configs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import ConfigDict

from sentcomp.errors import SentcompError

STAGES = "stages"
STAGE_ORDER = "stage_order"
REFERENCE_PREFIX = "stage:"


def is_composed(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` is a composed config (it has ``stages``)."""
    return STAGES in config


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """The stage names in running order, after checking the composed config's shape."""
    if "program" in config:
        raise SentcompError("A composed config (with 'stages') must not also name a 'program': each stage names "
                            "its own. Remove config.program or config.stages.")
    stages = config[STAGES]
    if not isinstance(stages, ml_collections.ConfigDict) or not stages:
        raise SentcompError("config.stages must be a non-empty group of stage name -> program config.")
    order = list(config.get(STAGE_ORDER, ()))
    if sorted(order) != sorted(stages.keys()) or len(set(order)) != len(order):
        raise SentcompError(f"config.{STAGE_ORDER} must list every stage of config.stages exactly once, in running "
                            f"order; it is {order}, the stages are {sorted(stages.keys())}.")
    for name in order:
        if not isinstance(stages[name], ml_collections.ConfigDict) or "program" not in stages[name]:
            raise SentcompError(f"config.stages.{name} must be a program config with a 'program' key, e.g. "
                                "'sentcomp.programs.table1'.")
    return order


def parse_reference(value: Any) -> tuple[str, str] | None:
    """``"stage:NAME/sub/path"`` -> ``("NAME", "sub/path")`` (``""`` without a path); None for any other value."""
    if not isinstance(value, str) or not value.startswith(REFERENCE_PREFIX):
        return None
    name, _, path = value[len(REFERENCE_PREFIX):].partition("/")
    return name, path


def resolve_value(value: Any, where: str, workdir: Path, earlier: Sequence[str], later: Sequence[str]) -> Any:
    """``value`` with every stage reference (also inside tuples and lists) replaced by its absolute path.

    ``where`` names the field for errors; ``earlier`` are the stages that run before this one, ``later`` this one
    and those after it.
    """
    if isinstance(value, (tuple, list)):
        return type(value)(resolve_value(item, f"{where}[{index}]", workdir, earlier, later)
                           for index, item in enumerate(value))
    reference = parse_reference(value)
    if reference is None:
        return value
    name, path = reference
    if name not in earlier:
        reason = "is this stage or runs after it" if name in later else "is not a stage of this config"
        raise SentcompError(f"{where} = {value!r} refers to stage {name!r}, which {reason}. A reference is "
                            f"'{REFERENCE_PREFIX}NAME' or '{REFERENCE_PREFIX}NAME/path' with NAME one of the stages "
                            f"that run before it: {list(earlier) or 'none (this is the first stage)'}.")
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise SentcompError(f"{where} = {value!r}: the path after the stage name must stay inside that stage's "
                            "workdir (relative, no '..').")
    return str(workdir / name / path) if path else str(workdir / name)


def reference_targets(stage: ml_collections.ConfigDict, workdir: str | Path) -> list[str]:
    """The paths the stage references of ``stage`` resolve to (``WORKDIR/NAME[/path]``), unchecked."""
    def targets(value: Any) -> list[str]:
        if isinstance(value, ml_collections.ConfigDict):
            return [target for item in value.values() for target in targets(item)]
        if isinstance(value, (tuple, list)):
            return [target for item in value for target in targets(item)]
        reference = parse_reference(value)
        if reference is None:
            return []
        name, path = reference
        return [str(Path(workdir).resolve() / name / path) if path else str(Path(workdir).resolve() / name)]

    return targets(stage)


def resolve_references(stage: ml_collections.ConfigDict, where: str, workdir: Path, earlier: Sequence[str],
                       later: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of the stage config ``stage`` (at ``config.<where>``) with its stage references resolved
    (:func:`resolve_value`)."""
    resolved = copy.deepcopy(stage)

    def walk(group: ml_collections.ConfigDict, prefix: str) -> None:
        for key, value in group.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}.{key}")
                continue
            new = resolve_value(value, f"{prefix}.{key}", workdir, earlier, later)
            if new is not value:
                group[key] = new

    walk(resolved, f"config.{where}")
    return resolved


def stage_configs(config: ml_collections.ConfigDict, workdir: str | Path) -> list[tuple[str, ConfigDict]]:
    """``[(name, resolved stage config)]`` in running order; a stage runs in ``Path(workdir).resolve() / name``."""
    workdir = Path(workdir).resolve()
    order = stage_names(config)
    return [(name, resolve_references(config[STAGES][name], f"{STAGES}.{name}", workdir, order[:index],
                                      order[index:]))
            for index, name in enumerate(order)]


def describe(config: ml_collections.ConfigDict, workdir: str | Path, complete: Sequence[bool]) -> str:
    """One line per stage for a dry run: position, name, program, workdir, and whether it is already complete."""
    lines = []
    for index, ((name, stage), done) in enumerate(zip(stage_configs(config, workdir), complete)):
        status = "complete (skipped)" if done else "to run"
        lines.append(f"stage {index + 1}: {name}  [{stage.program}]  -> {Path(workdir).resolve() / name}  {status}")
    return "\n".join(lines)
