"""One run per workdir at a time: a second run on a workdir another run is writing stops at once with a clear
message, and writes nothing; the lock dies with the run, so a killed run leaves nothing to clean up."""

import subprocess
import sys

import pytest

from sentcomp.errors import SentcompError
from sentcomp.launcher import runner
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config
from sentcomp.results import layout

SPEC = f"{EXPERIMENTS_DIR}/device_check.py:smoke,only=identities"

HOLD_LOCK = """
import sys, time
from pathlib import Path
from sentcomp.launcher import runner
with runner.exclusive(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_busy_workdir_stops_and_writes_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = r"is being written by another run \(pid \d+ on .*\).*another --workdir"
        with pytest.raises(SentcompError, match=busy):
            runner.run_program(load_config(SPEC), tmp_path)
        assert not (tmp_path / layout.CONFIG_FILE).exists() and not (tmp_path / layout.DONE_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    runner.run_program(load_config(SPEC), tmp_path)  # the holder was killed: its lock went with it
    assert runner.read_done(tmp_path) is not None
