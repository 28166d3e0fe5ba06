"""The one training loop of pretraining, fine-tuning, distillation and the synthetic-language runs.

``train_loop(state, step_fn, batches, start, num_steps, hooks, ...)`` runs steps ``start .. num_steps − 1`` (the
state after step ``t`` has seen ``t + 1`` batches; a resumed run passes the restored step as ``start``) and owns
what every run does around the step function:

* **timing and throughput**: each step is timed (its outputs fetched, so the device work is waited for); a
  metrics row's ``tokens_per_s = Σ tokens / Σ seconds`` and ``mfu = Σ flops / Σ seconds / (peak · devices)``
  (:func:`sentcomp.training.throughput.mfu`) are over the steps since the previous row, with the tokens and model
  FLOPs each :class:`Batch` declares; ``train_loss`` is the mean step loss and ``train_seconds`` the summed step
  time over the same steps;
* **the divergence check**: a non-finite loss (or ``params_finite`` false, when the step reports it) raises
  :class:`TrainingDiverged` naming the step, after the checkpoints in flight are written; no checkpoint is saved
  from then on, so the last good one stays the latest (and a re-run resumes from it);
* **metrics rows**: at a step where a hook returns a mapping, one row ``{"step", "train_loss", "tokens_per_s",
  "mfu", "train_seconds", **the hooks' entries}`` goes to ``metrics.jsonl``, TensorBoard and W&B
  (:func:`sentcomp.training.tracking.append_metrics`);
* **checkpoints**: after the row, at every ``Checkpointing.every``-th step, at every step that logged a row when
  ``Checkpointing.with_rows``, and at the last step (``num_steps``, or the step ``stop`` ended the run at), with
  the meta ``Checkpointing.meta(step)`` (which must hold ``"step"``); the manager is closed when the loop ends
  or diverges;
* **the progress bar** (tqdm; on process 0 when ``progress``): the steps, the current loss, tokens/s and MFU.

Hooks are ``every(n, fn)`` (steps ``n, 2n, ...`` and the last one) or ``at_steps(steps, fn)``; ``fn`` gets a
:class:`StepDone` (steps done, the new state, the step's fetched metrics) and returns a mapping of row entries or
None. They run in order, after the divergence check and before the row and the checkpoint. ``stop()`` (checked
before each step) ends the run early, e.g. fine-tuning's early stopping.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sentcomp import parallel
from sentcomp.errors import SentcompError
from sentcomp.training import checkpoints as checkpoints_lib
from sentcomp.training import throughput, tracking


class TrainingDiverged(SentcompError):
    """The loss (or the parameters) became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """One step's input and its cost: ``step_fn(state, *inputs)``; ``tokens`` it trains on (real ones, padding
    not counted) and the model ``flops`` it takes (forward and backward)."""

    inputs: tuple
    tokens: int
    flops: float


@dataclasses.dataclass(frozen=True)
class StepDone:
    """What a hook sees: ``step`` steps are done, ``state`` is the state after them, ``metrics`` the last step's
    (fetched: ``loss``, and what else the step function reports, e.g. ``grad_norm``). A hook may set entries of a
    dict ``state`` in place (fine-tuning keeps its best parameters so): the loop checkpoints and continues from
    that state."""

    step: int
    state: Any
    metrics: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(StepDone)`` at the steps ``due(step, num_steps)`` picks; returns row entries or None."""

    due: Callable[[int, int], bool]
    fn: Callable[[StepDone], Mapping[str, Any] | None]


def every(n: int, fn: Callable[[StepDone], Mapping[str, Any] | None]) -> Hook:
    """A hook at steps ``n, 2n, ...`` and at the last step."""
    if n < 1:
        raise SentcompError(f"A hook's period must be ≥ 1, got {n}.")
    return Hook(lambda step, num_steps: step % n == 0 or step == num_steps, fn)


def at_steps(steps: Iterable[int], fn: Callable[[StepDone], Mapping[str, Any] | None]) -> Hook:
    """A hook at the given steps (counted in steps done)."""
    chosen = frozenset(int(step) for step in steps)
    return Hook(lambda step, num_steps: step in chosen, fn)


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """When the loop saves a checkpoint (module docstring) and with which meta; ``manager``: an Orbax manager
    (:func:`sentcomp.training.checkpoints.resume`)."""

    manager: Any
    meta: Callable[[int], dict[str, Any]]
    every: int = 0  # 0: no periodic checkpoints
    with_rows: bool = False


@dataclasses.dataclass(frozen=True)
class Throughput:
    """The hardware a row's MFU is relative to: ``peak`` FLOP/s per device (:func:`throughput.peak_flops`) and
    the number of devices the steps run on."""

    peak: float
    devices: int


@dataclasses.dataclass
class _Window:
    """The steps since the previous metrics row."""

    losses: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0

    def add(self, loss: float, batch: Batch, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += batch.tokens
        self.flops += batch.flops
        self.seconds += seconds

    def row(self, hardware: Throughput) -> dict[str, float]:
        speed = self.tokens / max(self.seconds, 1e-9)
        flops_per_token = self.flops / max(self.tokens, 1)
        return {"train_loss": float(np.mean(self.losses)), "tokens_per_s": speed,
                "mfu": throughput.mfu(speed, flops_per_token, hardware.peak, hardware.devices),
                "train_seconds": self.seconds}


def diverged(metrics: Mapping[str, Any]) -> bool:
    """Whether a step's metrics show a non-finite loss or (when reported) non-finite parameters."""
    return not (np.isfinite(metrics["loss"]) and bool(metrics.get("params_finite", True)))


def divergence_error(name: str, step: int, metrics: Mapping[str, Any], last_saved: int | None, directory,
                     hint: str) -> TrainingDiverged:
    """The one error of a diverged run: the step, the loss, which checkpoint is kept, and ``hint`` (the fix)."""
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {directory}" if last_saved is not None
            else "no checkpoint was written yet")
    parameters = "" if metrics.get("params_finite", True) else ", non-finite parameters"
    return TrainingDiverged(f"Training diverged at step {step}: loss {float(metrics['loss'])}{parameters} ({name}); "
                            f"{kept}. {hint}")


def train_loop(state, step_fn: Callable, batches: Callable[[int], Batch], start: int, num_steps: int,
               hooks: Iterable[Hook] = (), *, workdir: Path, checkpointing: Checkpointing, hardware: Throughput,
               name: str, hint: str, last_saved: int | None = None, progress: bool = True,
               stop: Callable[[], bool] | None = None) -> tuple[Any, int]:
    """Runs steps ``start .. num_steps − 1`` of ``step_fn(state, *batches(step).inputs) -> (state, metrics)``
    (``metrics``: ``loss``, optionally ``params_finite``) with ``hooks``; returns ``(state, steps done)``.

    ``name`` labels the progress bar and the divergence error, whose ``hint`` says what to change;
    ``last_saved``: the step of the checkpoint the run resumed from (None: none). The contract: the module
    docstring."""
    hooks = tuple(hooks)
    window, step = _Window(), start
    manager = checkpointing.manager
    bar = tqdm(total=num_steps, initial=start, desc=name, unit="step",
               disable=not (progress and parallel.is_main_process()))
    stopped = stop is not None and stop()
    while step < num_steps and not stopped:
        batch = batches(step)
        began = time.perf_counter()
        state, metrics = step_fn(state, *batch.inputs)
        metrics = parallel.fetch(metrics)
        seconds = time.perf_counter() - began
        step += 1
        if diverged(metrics):
            _finish(bar, manager)
            raise divergence_error(name, step, metrics, last_saved, manager.directory, hint)
        window.add(float(metrics["loss"]), batch, seconds)
        bar.update(1)
        speed = batch.tokens / max(seconds, 1e-9)
        utilisation = throughput.mfu(speed, batch.flops / max(batch.tokens, 1), hardware.peak, hardware.devices)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{speed:.3g}", mfu=f"{utilisation:.1%}")
        done = StepDone(step, state, metrics)
        entries = [hook.fn(done) for hook in hooks if hook.due(step, num_steps)]
        logged = any(entry is not None for entry in entries)
        if logged:
            row = {"step": step, **window.row(hardware)}
            for entry in entries:
                row.update(entry or {})
            tracking.append_metrics(workdir, row)
            window = _Window()
        stopped = stop is not None and stop()
        last = step == num_steps or stopped
        if (last or (checkpointing.every and step % checkpointing.every == 0)
                or (logged and checkpointing.with_rows)):
            checkpoints_lib.save_checkpoint(manager, state, checkpointing.meta(step))
            last_saved = step
    _finish(bar, manager)
    return state, step


def _finish(bar, manager) -> None:
    """Closes the progress bar, then the checkpoint manager once the checkpoints in flight are written."""
    bar.close()
    manager.wait_until_finished()
    manager.close()
