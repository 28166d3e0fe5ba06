"""The command line: ``python -m sentcomp.main --config=experiments/X.py[:args] --workdir=DIR``.

The config file's ``get_config(arg)`` returns an ``ml_collections.ConfigDict`` whose ``program`` names a module
with ``run(config, workdir)``; this file only parses flags, records the config in the workdir and calls it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from sentcomp.errors import SentcompError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. experiments/table1.py:smoke")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding the run's record (config, metrics, results).")
flags.mark_flags_as_required(["config", "workdir"])


def run_program(config, workdir: str | Path):
    """Runs the program ``config.program`` names in ``workdir``, after saving the config there."""
    if "program" not in config:
        raise SentcompError("The config has no 'program' key: set it to the module to run, e.g. 'sentcomp.evaluate'.")
    try:
        program = importlib.import_module(config.program)
    except ModuleNotFoundError as error:
        raise SentcompError(f"config.program = {config.program!r} is not an importable module ({error}).") from None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    return program.run(config, workdir)


def main(argv):
    del argv
    try:
        run_program(_CONFIG.value, _WORKDIR.value)
    except SentcompError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
