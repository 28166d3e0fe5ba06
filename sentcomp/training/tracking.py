"""The metrics log of a training run: ``metrics.jsonl`` (one JSON row per logged step), mirrored live as
TensorBoard scalars in ``workdir/tensorboard/`` and, when ``SENTCOMP_WANDB_PROJECT`` is set and ``wandb`` installed,
to Weights & Biases (:func:`append_metrics`); :func:`truncate_metrics` drops the rows a resumed run recomputes.
"""

from __future__ import annotations

import atexit
import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sentcomp import parallel
from sentcomp.results import layout, plots, storage

WANDB_PROJECT_VARIABLE = "SENTCOMP_WANDB_PROJECT"


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl``; a torn last line (a kill mid-append) is skipped with a warning."""
    return storage.read_json_lines(workdir / layout.METRICS_FILE)


def truncate_metrics(workdir: Path, step: int) -> None:
    """Drops the metrics lines logged after ``step`` (by a run that died before its next checkpoint). The next
    TensorBoard event file of ``workdir`` then starts with a purge at ``step + 1`` (what tensorboardX's
    ``SummaryWriter(purge_step=step + 1)`` writes), so TensorBoard hides the dropped steps' old values."""
    kept = [row for row in read_metrics(workdir) if row["step"] <= step]
    storage.write_text(workdir / layout.METRICS_FILE, "".join(json.dumps(row) + "\n" for row in kept))
    close_metrics(workdir)
    _PURGE_STEPS[_log_key(workdir)] = step + 1


def scalar_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row by tag: nested dicts flattened with "/" (``{"probe": {"sst2": 0.8}}`` ->
    ``"probe/sst2"``); the top-level ``"step"`` and what is not a number (strings, booleans, lists) left out."""
    return {tag: float(value) for tag, value in storage.flatten(row, separator="/").items()
            if tag != "step" and plots.is_number(value)}


def append_metrics(workdir: Path, row: dict[str, Any]) -> None:
    """Logs ``row`` (a dict with an integer ``"step"``), on process 0 only: one line of ``workdir/metrics.jsonl``;
    its numbers (:func:`scalar_metrics`) as TensorBoard scalars at that step in ``workdir/tensorboard/``, written
    and flushed before returning (``tensorboard --logdir`` shows a run live); and, when the environment variable
    ``SENTCOMP_WANDB_PROJECT`` is set and ``wandb`` is installed, ``run.log(scalars, step=step)`` into the W&B run
    of that project named after the workdir (its id a hash of the workdir path, so a resumed run continues it).
    """
    if not parallel.is_main_process():
        return
    storage.append_json_line(workdir / layout.METRICS_FILE, row)
    scalars = scalar_metrics(row)
    if scalars:
        _event_log(workdir).write(int(row["step"]), scalars)
        _wandb_log(workdir, scalars, int(row["step"]))


def close_metrics(workdir: Path | None = None) -> None:
    """Closes the TensorBoard event file and finishes the W&B run :func:`append_metrics` holds open for
    ``workdir`` (all of them when None; called at exit). A later :func:`append_metrics` opens new ones."""
    keys = list(_EVENT_LOGS) if workdir is None else [_log_key(workdir)]
    for key in keys:
        if key in _EVENT_LOGS:
            _EVENT_LOGS.pop(key).close()
    if _WANDB and (workdir is None or _WANDB["key"] == _log_key(workdir)):
        run = _WANDB.pop("run")
        _WANDB.clear()
        if run is not None:
            run.finish()


class _EventLog:
    """One TensorBoard event file, written synchronously: tensorboardX's ``SummaryWriter`` queues events for a
    background thread and its ``flush()`` does not wait for them, so a row could sit unwritten for minutes."""

    def __init__(self, directory: Path, purge_step: int | None):
        # imported on first use: tensorboardX's package loads torch when it is installed (~3 s), which a process
        # that logs no metrics (the main job, checkpoint reads, evaluations) need not pay
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        directory.mkdir(parents=True, exist_ok=True)
        # names sort by start time; the suffix keeps a log reopened within the same second from overwriting
        # the previous one (tensorboardX names files by the second and opens them with "wb")
        self.writer = EventsWriter(str(directory / "events"), f".{time.time_ns()}")
        if purge_step is not None:  # exactly what SummaryWriter(purge_step=...) writes first
            self.writer.write_event(Event(wall_time=time.time(), step=purge_step, file_version="brain.Event:2"))
            self.writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                          session_log=SessionLog(status=SessionLog.START)))
        self.writer.flush()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        values = [value for tag, number in scalars.items() for value in scalar(tag, number).value]
        self.writer.write_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_EVENT_LOGS: dict[str, _EventLog] = {}  # open event files by workdir
_PURGE_STEPS: dict[str, int] = {}  # first step of the next event file by workdir, after truncate_metrics
_WANDB: dict[str, Any] = {}  # the W&B run open in this process: {"key": workdir, "run": run or None if failed}


def _log_key(workdir: Path) -> str:
    return str(Path(workdir).resolve())


def _event_log(workdir: Path) -> _EventLog:
    key = _log_key(workdir)
    if key not in _EVENT_LOGS:
        _EVENT_LOGS[key] = _EventLog(Path(workdir) / layout.TENSORBOARD_DIR, _PURGE_STEPS.pop(key, None))
    return _EVENT_LOGS[key]


def _wandb_log(workdir: Path, scalars: dict[str, float], step: int) -> None:
    """``run.log(scalars, step=step)`` into the workdir's W&B run if W&B is set up (see :func:`append_metrics`);
    one run is open at a time (W&B's default), so logging to another workdir finishes the previous one's."""
    project = os.environ.get(WANDB_PROJECT_VARIABLE)
    if not project:
        return
    key = _log_key(workdir)
    if _WANDB.get("key") != key:
        if _WANDB:
            close_metrics(Path(_WANDB["key"]))
        _WANDB.update(key=key, run=_wandb_init(project, Path(key)))
    if _WANDB["run"] is not None:
        _WANDB["run"].log(scalars, step=step)


def _wandb_init(project: str, workdir: Path):
    """The W&B run of ``workdir`` (created or resumed), or None with a warning if W&B is missing or fails."""
    try:
        import wandb
    except ImportError:
        warnings.warn(f"{WANDB_PROJECT_VARIABLE} is set but wandb is not installed (pip install wandb): the metrics "
                      "go to metrics.jsonl and TensorBoard only.", stacklevel=3)
        return None
    try:
        return wandb.init(project=project, name=workdir.name, dir=str(workdir), resume="allow",
                          id=storage.content_hash(str(workdir)))
    except Exception as error:  # W&B is a view of the run: training goes on without it
        warnings.warn(f"W&B logging is off for {workdir}: wandb.init failed ({type(error).__name__}: {error}).",
                      stacklevel=3)
        return None


atexit.register(close_metrics)
