"""The suite's compile report (``SENTCOMP_COMPILE_REPORT``, ``tests/conftest.py``; docs/testing.md): a pytest run
with it set writes one JSON line ``{"test", "program", "seconds"}`` per XLA compilation, naming the test that
compiled it. Checked on a one-test session run in a child process with this suite's conftest."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ONE_TEST = '''
import jax
import numpy as np


def test_compiles_a_named_program():
    @jax.jit
    def doubled_sum_for_the_report(x):
        return 2 * x.sum()

    assert float(doubled_sum_for_the_report(np.arange(3.0, dtype=np.float32))) == 6.0
'''


def test_each_compilation_is_recorded_with_its_test_and_program(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_one.py").write_text(ONE_TEST)
    prefix = tmp_path / "report"
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    env["SENTCOMP_COMPILE_REPORT"] = str(prefix)
    finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_one.py"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    records = [json.loads(line) for line in Path(f"{prefix}.main.jsonl").read_text().splitlines()]
    named = [record for record in records if "doubled_sum_for_the_report" in record["program"]]
    assert len(named) == 1, records
    assert named[0]["test"] == "test_one.py::test_compiles_a_named_program"
    assert named[0]["seconds"] >= 0
