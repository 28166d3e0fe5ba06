"""The command line: run one experiment, or a sweep of them, on one machine or many.

    python -m sentcomp.main --config=experiments/X.py[:args] --workdir=DIR [--config.key=value ...]
    python -m sentcomp.main --config=experiments/X.py --workdir=DIR --sweep [--parallel=N]
    python -m sentcomp.main ... --dry_run       # validate and print the config (the sweep's points, the stages)

The config file's ``get_config(arg)`` returns an ``ml_collections.ConfigDict`` whose ``program`` names a module
with ``run(config, workdir)`` (conventions in :mod:`sentcomp.launcher.runner`; sweeps in
:mod:`sentcomp.launcher.sweep`). Before any work: ``--config.key=value`` overrides must name existing keys with
values of the right type, required fields (placeholders) must be set, and a workdir that already holds a run
must have been run with the same config, in which case the program resumes. A user mistake prints one ``error:``
line and exits with code 2. Compiled programs go to JAX's persistent compilation cache
(:func:`~results.timings.enable_compilation_cache`: ``~/.cache/sentcomp/xla``; ``SENTCOMP_XLA_CACHE=off`` to not).

Several processes (hosts) run the same command and join JAX's multi-process runtime first:

    --distributed                     let JAX detect the cluster (Cloud TPU VM slices, SLURM, Open MPI)
    --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit (or JAX_COORDINATOR_ADDRESS,
                                      JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment)
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from sentcomp import parallel
from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files, runner, stages, sweep, sweep_runner
from sentcomp.launcher.runner import run_program
from sentcomp.results import layout, storage, timings

__all__ = ["run_program", "main", "run_cli"]

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. experiments/table1.py:smoke")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding the run's record (config, metrics, results).",
                               required=True)
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every point of the config file's get_sweep() into WORKDIR/<point>/.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "With --sweep: how many points run at once (in subprocesses).",
                                 lower_bound=1)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate the config (and sweep), print what would run, run nothing.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-host JAX run, the cluster detected by JAX.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0..num_processes-1.")
_RESUME_MAY_CHANGE = flags.DEFINE_list(
    "resume_may_change", [], "Dotted config keys allowed to differ from the run WORKDIR already holds (added to the "
    "config's own resume_may_change), e.g. --resume_may_change=num_steps,checkpoint.keep.")
flags.mark_flag_as_required("config")

_OVERRIDE = re.compile(r"^--(?:no)?config\.([^=\s]+)")


def _fail(message: object) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_spec(args: list[str]) -> str | None:
    """The value of the last ``--config`` in ``args`` (``--config=X`` or ``--config X``), as absl reads it."""
    spec = None
    for index, arg in enumerate(args):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and index + 1 < len(args):
            spec = args[index + 1]
    return spec


def check_config_flags(args: list[str]):
    """The ``--config`` file must load and every ``--config.a.b=...`` must name one of its keys; otherwise
    SentcompError says what is wrong (and the valid keys). Returns the config (None without ``--config``)."""
    spec = _config_spec(args)
    if spec is None:
        return None  # absl reports the missing required flag
    config = config_files.load_config(spec)
    for key in (match.group(1) for match in map(_OVERRIDE.match, args) if match):
        if key == layout.RESUME_MAY_CHANGE and key not in config:
            raise SentcompError(f"This config has no {key} field: list the keys allowed to change with "
                                f"--{key}=key1,key2 (a flag of its own, not --config.{key}).")
        config_files.check_key(config, key)
        config_files.check_unlinked_override(config, key)
    return config


def with_resume_may_change(config, keys: list[str]):
    """``config`` with ``keys`` added to its ``resume_may_change`` (created if the config has none)."""
    if not keys:
        return config
    for key in keys:
        config_files.check_key(config, key)
    with config.unlocked():
        config[layout.RESUME_MAY_CHANGE] = tuple(dict.fromkeys((*config.get(layout.RESUME_MAY_CHANGE, ()), *keys)))
    return config


def _expected_type(config, message: str) -> str:
    """`` (config.KEY has type TYPE, default VALUE)`` for the override an absl flag error names, if any."""
    match = re.search(r"--config\.([\w.]+)", message)
    if config is None or match is None:
        return ""
    value = config
    for part in match.group(1).split("."):
        value = value[part]
    return f" (config.{match.group(1)} has type {type(value).__name__}, default {value!r})"


def _orbax_one_line(record: logging.LogRecord) -> bool:
    """Logging filter: Orbax logs a failed background write with its traceback once per thread involved (hundreds
    of lines for one full disk); the failure itself is raised as one SentcompError naming the cause
    (:func:`sentcomp.training.checkpoints.save_checkpoint`), so at the default verbosity these records keep their
    message line only (``--verbosity=0`` shows the tracebacks)."""
    if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with override keys checked first and flag errors shown as one clean line."""
    config = None
    try:
        config = check_config_flags(argv[1:])
        remaining = flags.FLAGS(argv)
        if flags.FLAGS["verbosity"].using_default_value:  # else app.run turns on INFO, where Orbax logs every
            # checkpoint step at length; --verbosity=0 shows it. The ignore: absl types FlagValues.__setattr__
            # as generic in the value ((name, value: _T) -> _T), which mypy cannot bind in an assignment.
            flags.FLAGS.verbosity = absl_logging.WARNING  # type: ignore[assignment]
            logging.getLogger("absl").addFilter(_orbax_one_line)
        return remaining
    except SentcompError as error:
        _fail(error)
    except flags.Error as error:
        _fail(f"{error}{_expected_type(config, str(error))}")


def check_swept_overrides(overrides: list[str], points: list[dict]) -> None:
    """A ``--config.KEY`` override of a key the sweep sets (or of a group holding one) would be replaced at every
    point, silently: refused, naming the keys."""
    swept = {key for point in points for key in point}
    clashes = sorted(key for key in overrides
                     if any(name == key or name.startswith(key + ".") or key.startswith(name + ".") for name in swept))
    if clashes:
        raise SentcompError(f"--config.{clashes[0]} overrides a key the sweep sets at every point "
                            f"({', '.join(clashes)}; swept: {', '.join(sorted(swept))}), so it would be ignored. "
                            "Drop the override, or change the values in the config file's get_sweep().")


def check_swept_arguments(spec: str, points: list[dict]) -> None:
    """A ``name=value`` config-file argument that decides a key the sweep sets would be replaced at every point,
    silently: refused, naming both."""
    swept = {key for point in points for key in point}
    for item, keys in config_files.keys_set_by_arguments(spec).items():
        clashes = sorted(key for key in keys if any(storage.is_under(key, [name]) for name in swept))
        if clashes:
            raise SentcompError(f"The config argument {item} sets {', '.join(clashes)}, which the sweep sets at every "
                                f"point (swept: {', '.join(sorted(swept))}), so it would be ignored. Drop the "
                                "argument, or change the values in the config file's get_sweep().")


def sweep_from_flags(config, workdir: str) -> None:
    """``--sweep``: every point of the config file's ``get_sweep()`` into ``workdir/<point>/``."""
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    points = config_files.load_sweep(spec)
    check_swept_overrides(list(config_flags.get_override_values(flags.FLAGS["config"])), points)
    check_swept_arguments(spec, points)
    if _DRY_RUN.value:
        for point, name in zip(points, sweep.point_names(points)):
            point_config = config_files.override(config, point)
            runner.validate(point_config, f"{workdir}/{name}")
            print(f"{workdir}/{name}")
            print_stages(point_config, f"{workdir}/{name}")
        return
    rows = sweep_runner.run_sweep(config, points, workdir, _PARALLEL.value)
    print(f"Sweep table: {workdir}/sweep.md")
    failed = [row["name"] for row in rows if row["status"] == "failed"]
    if failed:
        raise SentcompError(f"{len(failed)} of {len(rows)} sweep points failed: {', '.join(failed)} "
                            f"(see {workdir}/sweep.md).")


def print_stages(config, workdir: str) -> None:
    """A composed config's stages, one line each (what a dry run would run); nothing for a single program."""
    if stages.is_composed(config):
        print(stages.describe(config, workdir, runner.stages_complete(config, workdir)))


def run_from_flags() -> None:
    config, workdir = with_resume_may_change(_CONFIG.value, _RESUME_MAY_CHANGE.value), _WORKDIR.value
    if _PARALLEL.value > 1 and not _SWEEP.value:
        raise SentcompError("--parallel sets how many sweep points run at once: use it with --sweep.")
    if _SWEEP.value:
        sweep_from_flags(config, workdir)
    elif _DRY_RUN.value:
        runner.validate(config, workdir)
        print(config)
        print_stages(config, workdir)
    else:
        run_program(config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
    timings.set_cpu_defaults()  # before JAX starts its backends
    try:
        if not _DRY_RUN.value:  # a dry run computes nothing, so it can check a cluster's command anywhere
            parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                            _DISTRIBUTED.value)
            timings.enable_compilation_cache()  # compiled programs kept for the next run (SENTCOMP_XLA_CACHE=off)
        run_from_flags()
    except SentcompError as error:
        _fail(error)


def run_cli(args: list[str]) -> int:
    """``python -m sentcomp.main ARGS`` in this process (tests, notebooks: no new interpreter, no JAX import):
    parses ``args`` afresh and runs; returns the exit code (2 after a user mistake, whose ``error:`` line went to
    stderr). absl's flags are global: the previous parse is forgotten first."""
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)  # the override flags ml_collections defined for the previous config
    flags.FLAGS.unparse_flags()
    saved, sys.argv = sys.argv, ["sentcomp.main", *args]  # ml_collections reads the overrides from sys.argv
    try:
        main(parse_flags(sys.argv))
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
