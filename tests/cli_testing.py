"""Reading the outcome of ``python -m sentcomp.main`` (a ``CompletedProcess``, from a real process or from the
in-process ``cli`` fixture of conftest.py): the one-line user error, or a success."""

import subprocess


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's user-facing error: exit code 2 and exactly one ``error:`` line on stderr, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def ok(result: subprocess.CompletedProcess) -> str:
    """The standard output of a run that succeeded (exit code 0)."""
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
