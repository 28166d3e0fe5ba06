"""Running one program in its workdir: validation before any work, the config record, resume, completion.

**Program convention.** ``config.program`` names a module with a plain function ``run(config, workdir)``.
It returns a dict of *headline metrics* (name -> number or short string, e.g. ``{"test_accuracy": 0.87}``)
or None; when it returns None, the scalar top-level entries of the ``results.json`` it wrote are the
headline. Programs resume by themselves from what their workdir already holds.

**Workdir record** written here (by process 0 only when several processes run):

* ``config.json``: the final config (after overrides), written before the program starts;
* ``runs.jsonl``: one line per start of the run (the first and every resume) recording what produced it:
  package versions, Python, the sentcomp version and git commit (with a dirty flag), the JAX backend and
  devices, the process count and the command line (:mod:`sentcomp.launcher.provenance`, which warns when a
  resume starts in another setting than the previous start);
* ``done.json``: the headline metrics, written (atomically) when ``run`` returned: its presence means the run
  is complete, and sweeps skip such points and tabulate its metrics.

Before any work :func:`validate` checks that the program exists, that every required field (an
``ml_collections`` placeholder) is set, and, if the workdir already holds a run, that its ``config.json``
equals the new config except for the dotted keys the config lists in ``resume_may_change`` (e.g.
``("num_steps",)`` to extend a training run); otherwise it fails and shows the difference.
"""

from __future__ import annotations

import importlib
import json
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from sentcomp import parallel, storage
from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files, provenance

CONFIG_FILE = "config.json"
DONE_FILE = "done.json"
RESULTS_FILE = "results.json"
RESUME_MAY_CHANGE = "resume_may_change"


def import_program(config: ml_collections.ConfigDict):
    """The module ``config.program`` names; it must define ``run(config, workdir)``."""
    if "program" not in config:
        raise SentcompError("The config has no 'program' key: set it to the module to run, "
                            "e.g. 'sentcomp.programs.table1'.")
    try:
        program = importlib.import_module(config.program)
    except ModuleNotFoundError as error:
        if error.name is None or not (config.program + ".").startswith(error.name + "."):
            raise  # the program exists but one of its own imports is missing: a bug, not a config mistake
        raise SentcompError(f"config.program = {config.program!r} is not an importable module ({error}).") from None
    if not callable(getattr(program, "run", None)):
        raise SentcompError(f"Program module {config.program!r} has no run(config, workdir) function.")
    return program


def check_resume(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """If ``workdir`` holds a run, its recorded config must equal ``config`` (except ``resume_may_change``)."""
    recorded_path = Path(workdir) / CONFIG_FILE
    if not recorded_path.exists():
        return
    recorded = json.loads(recorded_path.read_text())
    may_change = (RESUME_MAY_CHANGE, *config.get(RESUME_MAY_CHANGE, ()))
    differences = config_files.config_diff(recorded, config_files.to_plain(config), may_change)
    if differences:
        raise SentcompError(
            f"{workdir} already holds a run with a different config ({'; '.join(differences)}). Resuming would "
            "mix two experiments: use a new --workdir, or list the keys allowed to change in "
            f"config.{RESUME_MAY_CHANGE}."
        )


def validate(config: ml_collections.ConfigDict, workdir: str | Path):
    """All checks that must pass before any work starts; returns the program module."""
    program = import_program(config)
    config_files.check_required(config)
    check_resume(config, Path(workdir))
    return program


def _scalar(value: Any) -> Any:
    """A JSON scalar for a headline value (Python/numpy/JAX numbers, strings), or None if it is not one."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Number):
        return value.item() if hasattr(value, "item") else value
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    return None


def headline_metrics(returned: Any, workdir: Path) -> dict[str, Any]:
    """The program's headline: the scalars of what ``run`` returned, else those at the top of results.json."""
    source = returned
    if source is None and (Path(workdir) / RESULTS_FILE).exists():
        source = json.loads((Path(workdir) / RESULTS_FILE).read_text())
    if not isinstance(source, Mapping):
        return {}
    scalars = {str(key): _scalar(value) for key, value in source.items()}
    return {key: value for key, value in scalars.items() if value is not None}


def read_done(workdir: str | Path) -> dict[str, Any] | None:
    """The headline metrics of a completed run, or None if ``workdir`` holds no completed run."""
    path = Path(workdir) / DONE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def run_program(config: ml_collections.ConfigDict, workdir: str | Path):
    """Validates, records ``config.json`` and this start (``runs.jsonl``), runs ``config.program`` in ``workdir``,
    then writes ``done.json``.

    Returns what the program's ``run`` returned.
    """
    workdir = Path(workdir)
    program = validate(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if parallel.is_main_process():
        storage.write_json(workdir / CONFIG_FILE, config_files.to_plain(config))
        provenance.record_start(workdir)
    parallel.sync("sentcomp_workdir_ready")
    logging.info("Running %s in %s", config.program, workdir)
    returned = program.run(config, workdir)
    if parallel.is_main_process():
        storage.write_json(workdir / DONE_FILE, headline_metrics(returned, workdir))
    logging.info("Finished %s in %s", config.program, workdir)
    return returned
