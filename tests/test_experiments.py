"""Every config file in experiments/ (found at collection time, so new ones are covered automatically):
it loads, has a docstring with its launch command, its ``smoke`` variant runs through ``run_program`` (here,
or in the program's own test module), and the points of its sweep (if any) are valid overrides of it."""

import re
from pathlib import Path

import pytest

from sentcomp.launcher import runner, sweep
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, load_module, load_sweep, override

CONFIG_FILES = sorted(EXPERIMENTS_DIR.glob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.stem)
def test_config_file_documents_its_launch_command(path):
    module = load_module(path)
    assert "python -m sentcomp.main" in (module.__doc__ or ""), f"{path.name}: docstring lacks the launch command"
    config = load_config(str(path))
    runner.import_program(config)


def _smoke_runs_read_elsewhere() -> set[str]:
    """Programs whose smoke run another test module reads through the ``smoke_workdir`` fixture, which checks
    it: the longest runs of the suite, not repeated here."""
    others = [path for path in Path(__file__).parent.glob("test_*.py") if path.name != Path(__file__).name]
    return {name for path in others for name in re.findall(r'smoke_workdir\("(\w+)"\)', path.read_text())}


@pytest.mark.parametrize(
    "path", [path for path in CONFIG_FILES if path.stem not in _smoke_runs_read_elsewhere()], ids=lambda path: path.stem
)
def test_smoke_variant_runs(path, smoke_workdir):
    smoke_workdir(path.stem)


@pytest.mark.parametrize(
    "path", [path for path in CONFIG_FILES if hasattr(load_module(path), "get_sweep")], ids=lambda path: path.stem
)
def test_sweep_points_are_valid(path):
    for arg in (None, "smoke"):
        spec = f"{path}:{arg}" if arg else str(path)
        points = load_sweep(spec)
        sweep.point_names(points)
        base = load_config(spec)
        for point in points:
            override(base, point)
