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
* ``.lock``: held (``flock``) by the run writing the workdir; a second run on it stops at once (:func:`exclusive`);
* ``done.json``: the headline metrics, written (atomically) when ``run`` returned: its presence means the run
  is complete, and sweeps skip such points and tabulate its metrics.

Before any work, and before the workdir is written, :func:`validate` checks that ``--workdir`` can be a
directory, that the program exists, that every required field (an ``ml_collections`` placeholder) is set, the
program's own ``check_config(config)`` (:func:`check_program_config`: sizes, names, data and model paths), and,
if the workdir already holds a run, that its ``config.json`` equals the new config except for the dotted keys
the config lists in ``resume_may_change`` (e.g. ``("num_steps",)`` to extend a training run); otherwise it fails
and shows the difference. A run that produced no results (:func:`holds_results`) is replaced by the new config,
and an unreadable ``config.json`` or ``done.json`` is treated as absent, each with a warning naming the file.

A **composed config** (``config.stages``, :mod:`sentcomp.launcher.stages`) runs each of its stages through
:func:`run_program` into ``workdir/<stage>/``, in order, skipping complete ones; all are validated first.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import numbers
import os
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from sentcomp import parallel
from sentcomp.errors import ResumeRefused, SentcompError
from sentcomp.launcher import config_files, provenance, stages
from sentcomp.results import layout, storage

RESTORED_ON_REFUSAL = (layout.DONE_FILE, layout.CONFIG_FILE, layout.RUNS_FILE)  # see record_kept_on_refusal


def import_program(config: ml_collections.ConfigDict):
    """The module ``config.program`` names; it must define ``run(config, workdir)``. A composed config has no
    program of its own: every stage's is imported (checked) and None is returned."""
    if stages.is_composed(config):
        for name in stages.stage_names(config):
            import_program(config[stages.STAGES][name])
        return None
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


def holds_results(workdir: Path) -> bool:
    """Whether ``workdir`` holds anything a run produced: anything but the launcher's record
    (:data:`layout.RECORD_FILES`), the content-keyed caches (:data:`layout.KEYED_CACHES`, whose keys include
    everything that determines them) and the workdirs of runs inside it (a composed config's stages) that hold
    none themselves. A workdir without results may be taken over by a run with another config."""
    def produced(entry: Path) -> bool:
        if entry.name in layout.RECORD_FILES + layout.KEYED_CACHES:
            return False
        return holds_results(entry) if entry.is_dir() and (entry / layout.CONFIG_FILE).is_file() else True

    return any(produced(entry) for entry in Path(workdir).iterdir())


def check_resume(config: ml_collections.ConfigDict, workdir: Path,
                 record: ml_collections.ConfigDict | None = None) -> None:
    """If ``workdir`` holds a run, its recorded config must equal ``config`` (except ``resume_may_change`` and the
    :data:`sentcomp.results.layout.EXECUTION_KEYS`, e.g. the mesh).

    Two cases need no match, each with a warning: a ``config.json`` that cannot be read (empty or corrupt) is
    replaced, since what the workdir holds is reused only where its own fingerprint matches this config (Table-1
    cells, checkpoints, feature caches); and a run that never produced results (:func:`holds_results`, e.g. one
    that failed at once) is replaced by the corrected config.

    ``record`` is what ``config.json`` holds for ``config`` when they differ: a stage's config as written, its stage
    references (``"stage:NAME"``) unresolved, so a composed experiment moved, renamed or copied elsewhere still
    matches its record. (A stage recorded with absolute paths, before records kept references, matches
    ``config``.)"""
    recorded_path = Path(workdir) / layout.CONFIG_FILE
    if not recorded_path.exists():
        return
    recorded = storage.read_json_file(recorded_path, "it is replaced by this run's config (results the workdir "
                                      "holds are reused only where their own fingerprint matches)")
    if recorded is None:
        return
    may_change = (layout.RESUME_MAY_CHANGE, *layout.EXECUTION_KEYS, *config.get(layout.RESUME_MAY_CHANGE, ()))
    differences = config_files.config_diff(recorded, config_files.to_plain(config), may_change)
    if differences and record is not None:  # a stage: recorded with its stage references as written
        differences = config_files.config_diff(recorded, config_files.to_plain(record), may_change)
    if differences and not holds_results(workdir):
        warnings.warn(f"{workdir} holds a run with another config that produced no results "
                      f"({'; '.join(differences)}); this run replaces it.", stacklevel=2)
    elif differences:
        raise SentcompError(
            f"{workdir} already holds a run with a different config ({'; '.join(differences)}). Resuming would "
            "mix two experiments: use a new --workdir, or list the keys allowed to change in "
            f"config.{layout.RESUME_MAY_CHANGE}."
        )


def check_workdir_path(workdir: Path) -> None:
    """``workdir`` must be a directory or not exist yet, and no folder above it may be a file."""
    workdir = Path(workdir)
    for path in (workdir, *workdir.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == workdir else f"is under {path}, which is a file"
            raise SentcompError(f"--workdir {workdir} {where}: pass a directory (it is created if missing).")


def check_program_config(program, config: ml_collections.ConfigDict, pending: tuple[str, ...] = ()) -> None:
    """The program's own checks, ``check_config(config)`` if its module defines one: cheap checks of values,
    names and paths (sizes > 0, known tasks, data and model found offline) that must pass before the workdir is
    claimed, so a mistake never leaves a workdir holding a config that produced nothing.

    ``pending`` are paths an earlier stage has yet to write (:func:`sentcomp.launcher.stages.reference_targets`):
    an error that names one of them is left for when the stage starts; any other is raised now."""
    check = getattr(program, "check_config", None)
    if not callable(check):
        return
    try:
        check(config)
    except SentcompError as error:
        if not any(path in str(error) for path in pending):
            raise


def validate(config: ml_collections.ConfigDict, workdir: str | Path, program_checks: bool = True,
             record: ml_collections.ConfigDict | None = None, pending: tuple[str, ...] = ()):
    """All checks that must pass before any work starts (also those of ``--dry_run``); returns the program
    module, or None for a composed config (:mod:`sentcomp.launcher.stages`), whose every stage is checked against
    its own stage workdir. A stage that refers to an earlier stage's output gets its program's checks at once too;
    only an error naming that output (``pending``, not written yet) waits until the stage starts."""
    check_workdir_path(Path(workdir))
    if stages.is_composed(config):
        config_files.check_required(config)
        for name, stage in stages.stage_configs(config, workdir):
            written = config[stages.STAGES][name]
            validate(stage, Path(workdir) / name, record=written,
                     pending=tuple(stages.reference_targets(written, workdir)))
        check_resume(config, Path(workdir))
        return None
    program = import_program(config)
    config_files.check_required(config)
    if program_checks:
        check_program_config(program, config, pending)
    check_resume(config, Path(workdir), record)
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
    if source is None and (Path(workdir) / layout.RESULTS_FILE).exists():
        source = json.loads((Path(workdir) / layout.RESULTS_FILE).read_text())
    if not isinstance(source, Mapping):
        return {}
    scalars = {str(key): _scalar(value) for key, value in source.items()}
    return {key: value for key, value in scalars.items() if value is not None}


def read_done(workdir: str | Path) -> dict[str, Any] | None:
    """The headline metrics of a completed run, or None if ``workdir`` holds no completed run; an empty or
    corrupt ``done.json`` (a full disk) counts as not complete, with a warning, so the run is done again."""
    return storage.read_json_file(Path(workdir) / layout.DONE_FILE, "the run is treated as not complete and runs again")


def stages_complete(config: ml_collections.ConfigDict, workdir: str | Path) -> list[bool]:
    """For each stage of a composed config, in order: whether ``workdir/<stage>`` holds a completed run (process 0
    decides for all)."""
    names = stages.stage_names(config)
    return [bool(done) for done in parallel.broadcast_from_main(
        np.array([read_done(Path(workdir) / name) is not None for name in names]))]


def run_stages(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any] | None:
    """Runs each stage of a composed config into ``workdir/<stage>`` in order, skipping the complete ones;
    returns the last stage's headline (its done.json)."""
    staged = stages.stage_configs(config, workdir)
    for index, ((name, stage), done) in enumerate(zip(staged, stages_complete(config, workdir))):
        print(f"[stages] {index + 1}/{len(staged)} {name}: {'complete, skipped' if done else 'running'}", flush=True)
        if not done:
            run_program(stage, workdir / name, record=config[stages.STAGES][name])
    return read_done(workdir / staged[-1][0])


def run_program(config: ml_collections.ConfigDict, workdir: str | Path,
                record: ml_collections.ConfigDict | None = None):
    """Validates, records ``config.json`` (``record`` if given: a stage's config with its stage references as
    written, :func:`check_resume`) and this start (``runs.jsonl``), runs ``config.program`` in ``workdir`` (a
    composed config: each of its stages, :func:`run_stages`), then writes ``done.json``.

    Returns what the program's ``run`` returned (a composed config: its last stage's headline).
    """
    workdir = Path(workdir)
    program = validate(config, workdir, record=record)
    done = read_done(workdir) if parallel.is_main_process() else None
    if done is not None and not writable(workdir):
        print(f"{workdir} holds a complete run and cannot be written; its headline (done.json): {done}")
        return done
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SentcompError(f"Cannot create --workdir {workdir} ({error.strerror}): pass a directory you can "
                            "write.") from None
    with exclusive(workdir), record_kept_on_refusal(workdir):
        if parallel.is_main_process():
            (workdir / layout.DONE_FILE).unlink(missing_ok=True)  # complete again only if this run returns
            (workdir / layout.ERROR_FILE).unlink(missing_ok=True)  # an earlier attempt's failure
            plain = config_files.to_plain(config if record is None else record)
            storage.write_json(workdir / layout.CONFIG_FILE, plain)
            provenance.record_start(workdir)
        parallel.sync("sentcomp_workdir_ready")
        logging.info("Running %s in %s", config.get("program", "a composed config"), workdir)
        returned = program.run(config, workdir) if program is not None else run_stages(config, workdir)
        if parallel.is_main_process():
            storage.write_json(workdir / layout.DONE_FILE, headline_metrics(returned, workdir))
    logging.info("Finished %s in %s", config.get("program", "a composed config"), workdir)
    return returned


@contextlib.contextmanager
def record_kept_on_refusal(workdir: Path):
    """Puts the workdir's record (:data:`RESTORED_ON_REFUSAL`) back as it was when the program raises
    :class:`ResumeRefused` (it refused to continue the workdir before changing anything in it), so a finished run
    stays finished and the command that wrote it still resumes it."""
    before = {name: (workdir / name).read_bytes() if (workdir / name).is_file() else None
              for name in RESTORED_ON_REFUSAL} if parallel.is_main_process() else {}
    try:
        yield
    except ResumeRefused:
        for name, content in before.items():
            if content is None:
                (workdir / name).unlink(missing_ok=True)
            else:
                storage.write_bytes(workdir / name, content)
        raise


def writable(workdir: Path) -> bool:
    """Whether a file can be opened for writing in ``workdir`` (its lock file; permission bits do not bind root,
    and a read-only mount shows only when writing)."""
    try:
        open(Path(workdir) / layout.LOCK_FILE, "a").close()
    except OSError:
        return False
    return True


class WorkdirBusy(SentcompError):
    """Another run holds the workdir's lock: this one wrote nothing there (nor must its caller)."""

    def __init__(self, workdir: Path, holder: str):
        super().__init__(f"{workdir} is being written by another run ({holder or 'another process'}); two runs in "
                         "one workdir would interleave their results. Wait for it to finish, or use another --workdir.")


def busy(workdir: Path) -> WorkdirBusy | None:
    """The :class:`WorkdirBusy` error if another run holds ``workdir``'s lock now, else None; writes nothing."""
    try:
        handle = open(Path(workdir) / layout.LOCK_FILE)
    except OSError:
        return None  # no lock file: nobody holds it
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return WorkdirBusy(workdir, handle.read().strip())
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def exclusive(workdir: Path):
    """Holds ``workdir/.lock`` (an exclusive ``flock``, taken by process 0) while a run writes the workdir, so a
    second run started on the same workdir stops at once with a clear message instead of interleaving its
    files with the first's. The lock dies with its process (a killed run leaves nothing to clean up); the file
    names the holder. ``flock`` is advisory and may be ignored by some network filesystems."""
    if not parallel.is_main_process():
        yield
        return
    try:
        handle = open(workdir / layout.LOCK_FILE, "a+")
    except OSError as error:
        raise SentcompError(f"Cannot write in --workdir {workdir} ({error.strerror}): pass a directory you can "
                            "write.") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise WorkdirBusy(workdir, handle.read().strip()) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
