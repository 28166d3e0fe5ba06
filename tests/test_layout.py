"""The code's layout holds its rules: programs import libraries (never each other or the launcher), libraries
import neither, no module reaches into another's private names, and config files load without JAX."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sentcomp"
HEAVY = ("jax", "flax", "optax", "orbax", "transformers", "tokenizers", "torch", "tensorflow_datasets")


def imported_modules(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``import``/``from ... import`` in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def sentcomp_imports(path: Path) -> set[str]:
    """The sentcomp modules a file imports (``from sentcomp.x import y`` counts ``sentcomp.x.y`` when y is one)."""
    modules = set()
    for module, names in imported_modules(path):
        if module.split(".")[0] != "sentcomp":
            continue
        modules.add(module)
        submodules = (f"{module}.{name}" for name in names)
        modules.update(m for m in submodules if (PACKAGE.parent / m.replace(".", "/")).with_suffix(".py").exists())
    return modules


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("program", sorted(PACKAGE.glob("programs/[!_]*.py")), ids=relative)
def test_programs_import_neither_programs_nor_the_launcher(program):
    bad = {m for m in sentcomp_imports(program) if m.startswith(("sentcomp.programs", "sentcomp.launcher"))}
    assert not bad, f"{relative(program)} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "main.py"), ids=relative)
def test_only_the_command_line_imports_the_report_command(module):
    """The report is a command: what programs and libraries share with it (tables, statistics, the workdir layout)
    lives in :mod:`sentcomp.results`."""
    assert "sentcomp.report" not in sentcomp_imports(module) or module.name == "report.py"


def test_the_package_top_holds_at_most_twelve_modules():
    """New code goes into the folder of its role (kernels, models, data, training, evaluators, results, ...)."""
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 12, modules


def test_libraries_import_neither_programs_nor_the_launcher():
    roles = ("sentcomp.programs", "sentcomp.launcher")
    libraries = [p for p in PACKAGE.rglob("*.py")
                 if p.parent.name not in ("programs", "launcher") and p.name != "main.py"]
    bad = {relative(p): sorted(m for m in sentcomp_imports(p) if m.startswith(roles)) for p in libraries}
    assert not {path: modules for path, modules in bad.items() if modules}


def test_no_module_imports_another_modules_private_names():
    private = {f"{relative(path)}: from {module} import {name}"
               for path in [*PACKAGE.rglob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
               for module, names in imported_modules(path) if module.startswith("sentcomp")
               for name in names if name.startswith("_")}
    assert not private


def test_config_files_and_sweep_points_load_without_heavy_libraries():
    script = (
        "import sys\n"
        "from sentcomp.launcher import sweep\n"
        "from sentcomp.launcher.config_files import load_config, load_module\n"
        f"for path in sorted(__import__('pathlib').Path({str(ROOT / 'experiments')!r}).glob('*.py')):\n"
        "    load_config(str(path))\n"
        "    module = load_module(path)\n"
        "    if hasattr(module, 'get_sweep'):\n"
        "        module.get_sweep()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_programs_import_without_torch_or_scikit_learn():
    """A run loads torch (through tensorboardX, on its first metrics row) and scikit-learn (the device check's
    probe group) only when it uses them: importing a program loads neither (~5 s per process; docs/testing.md)."""
    script = (
        "import pkgutil, sys\n"
        "import sentcomp.programs as programs\n"
        "for module in pkgutil.iter_modules(programs.__path__):\n"
        "    __import__(f'sentcomp.programs.{module.name}')\n"
        "print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout
