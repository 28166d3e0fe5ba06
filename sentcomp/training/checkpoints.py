"""Orbax checkpoints that resume exactly: the run's manager (write failures that only the user can fix reported
at once), checksums recorded at commit and verified on restore, a corrupt latest checkpoint set aside for the
previous one (one written under one mesh restores onto another), and :func:`resume`, which refuses to continue a
run trained under other settings (:func:`resume_settings`, :func:`settings_differences`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # no public name in 0.12.8

from sentcomp import parallel
from sentcomp.errors import ResumeRefused, SentcompError
from sentcomp.results import layout, storage
from sentcomp.training.tracking import truncate_metrics


class _CheckpointManager(ocp.CheckpointManager):
    """Orbax's manager whose write failures that only the user can fix (no space left, no permission:
    :func:`~results.storage.write_failure_cause`) raise one :class:`SentcompError` at once: from ``save`` itself,
    or, for an asynchronous save, from the next ``save`` or ``wait_until_finished``. The checkpoints already
    written are kept (Orbax writes a step into a temporary directory, renamed only when complete, and deletes
    old steps only after a save succeeded)."""

    _saving: int | None = None  # the step of the latest save, which an asynchronous failure belongs to
    _failed = False  # a write failure was reported
    _unrecorded: frozenset[int] = frozenset()  # steps saved here whose checksums are not written yet

    def _reporting(self, call):
        try:
            return call()
        except Exception as error:
            cause = storage.write_failure_cause(error)
            if cause is None:
                raise
            self._failed = True
            kept = [step for step in self.all_steps() if step != self._saving]
            raise SentcompError(
                f"Writing the checkpoint of step {self._saving} to {self.directory} failed: {cause}. The last "
                f"complete checkpoint ({f'step {max(kept)}' if kept else 'none yet'}) is kept: free space or fix "
                "the permissions, then re-run the same command to resume from it."
            ) from None

    def save(self, step: int, *args, **kwargs) -> bool:
        self._reporting(self.check_for_errors)  # a previous asynchronous save's failure
        self._saving = step
        saved = self._reporting(lambda: super(_CheckpointManager, self).save(step, *args, **kwargs))
        self._unrecorded = self._unrecorded | {step} if saved else self._unrecorded
        # Orbax's save waits for the previous asynchronous save first: every step but this one is final
        self._record_checksums(exclude=step if self._options.enable_async_checkpointing else None)
        return saved

    def wait_until_finished(self) -> None:
        self._reporting(super().wait_until_finished)
        self._record_checksums()

    def _record_checksums(self, exclude: int | None = None) -> None:
        """Writes :data:`CHECKSUM_FILE` into each complete step this manager saved (process 0); ``exclude`` is an
        asynchronous save still in flight (the steps Orbax deleted meanwhile are forgotten)."""
        if parallel.is_main_process():
            for step in self._unrecorded & set(self.all_steps()) - {exclude}:
                record_checksums(Path(self.directory) / str(step))
        self._unrecorded = self._unrecorded & {exclude}

    def close(self) -> None:
        """Closes the manager; a failed asynchronous save already reported is not raised a second time."""
        try:
            self._reporting(super().close)
        except SentcompError:
            if not self._failed:
                raise
        else:
            self._record_checksums()


# Orbax's replica-parallel save spreads the write of a replicated array over its replicas (over hosts, on a
# pod), each writing one slice; cutting the slices compiles one program per array shape and replica, which for a
# small array costs far more than the write it shares (~80 compilations per tiny training run). Arrays whose
# slices would be smaller than this are written by one replica, as Orbax does without replica-parallel.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 2**20


def state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler (the one its ``StandardSave`` uses, same files) with arrays written replica-parallel
    only from :data:`REPLICA_PARALLEL_MIN_SLICE_BYTES` per slice; its own type registry, so Orbax's global one
    (which a user's code may use) is left as it is."""
    scalars = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalars), (float, scalars), (bytes, scalars), (np.number, scalars),
        (np.ndarray, ocp.type_handlers.NumpyHandler()), (str, ocp.type_handlers.StringHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
            # as Orbax's default handler: the per-array metadata that restores typed PRNG keys as keys
            array_metadata_store=array_metadata_store.Store())))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def save_state_args(state) -> ocp.args.PyTreeSave:
    """The save arguments of ``state`` for :func:`state_handler`."""
    return ocp.args.PyTreeSave(state)


def abstract_state(state):
    """``state``'s leaves as ``jax.ShapeDtypeStruct`` (shape, dtype, sharding): what a restore reads onto."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_state_args(abstract) -> ocp.args.PyTreeRestore:
    """The restore arguments for :func:`state_handler` that read a state onto ``abstract``'s shapes, dtypes and
    shardings (:func:`abstract_state`)."""
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def checkpoint_manager(workdir: Path, every: int, keep: int, asynchronous: bool) -> ocp.CheckpointManager:
    """The run's Orbax manager for ``workdir/checkpoints``: items ``state`` (:func:`state_handler`) and ``meta``
    (JSON); write failures reported as :class:`_CheckpointManager` says."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                           enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True)
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state = state_handler()
    handlers.add("state", ocp.args.PyTreeSave, state)
    handlers.add("state", ocp.args.PyTreeRestore, state)
    meta = ocp.JsonCheckpointHandler()
    handlers.add("meta", ocp.args.JsonSave, meta)
    handlers.add("meta", ocp.args.JsonRestore, meta)
    return _CheckpointManager(workdir / layout.CHECKPOINTS_DIR, options=options, handler_registry=handlers)


def save_checkpoint(manager: ocp.CheckpointManager, state, meta: dict[str, Any]) -> None:
    """Saves ``state`` and ``meta`` (with its ``"step"``) as a checkpoint; a write that fails for lack of space or
    permission raises :class:`SentcompError` naming the cause, the last complete checkpoint kept."""
    step = int(meta["step"])
    manager.save(step, args=ocp.args.Composite(state=save_state_args(state), meta=ocp.args.JsonSave(meta)),
                 force=True)


CHECKSUM_FILE = "sentcomp_checksums.json"


class CheckpointDamaged(Exception):
    """A checkpoint's files differ from the checksums recorded when it was committed."""


def file_checksums(step_dir: Path) -> dict[str, str]:
    """``{path relative to step_dir: sha256 of its bytes}`` of every file of a checkpoint step but
    :data:`CHECKSUM_FILE`."""
    sums = {}
    for path in sorted(Path(step_dir).rglob("*")):
        if path.is_file() and path.name != CHECKSUM_FILE:
            digest = hashlib.sha256()
            with open(path, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
            sums[str(path.relative_to(step_dir))] = digest.hexdigest()
    return sums


def record_checksums(step_dir: Path) -> None:
    """Writes ``step_dir/`` :data:`CHECKSUM_FILE` (:func:`file_checksums`) unless it exists: done once, when the
    step is complete, so a later truncation or bit flip of its array data is detected on restore
    (:func:`verify_checksums`) even where Orbax would read the damaged bytes without complaint. A step Orbax
    deletes meanwhile (``checkpoint.keep``) is skipped."""
    target = Path(step_dir) / CHECKSUM_FILE
    if target.exists():
        return
    try:
        storage.write_json(target, file_checksums(step_dir))
    except FileNotFoundError:
        return


def verify_checksums(step_dir: Path) -> None:
    """Raises :class:`CheckpointDamaged` naming the first file of ``step_dir`` that is missing or whose bytes
    differ from its recorded checksum; a step without a record (written before records existed, or killed
    between commit and record) is left to Orbax's own checks."""
    recorded = storage.read_json_file(Path(step_dir) / CHECKSUM_FILE, "the checkpoint is checked by Orbax's read "
                                      "alone")
    if recorded is None:
        return
    found = file_checksums(step_dir)
    for name, checksum in recorded.items():
        if found.get(name) != checksum:
            state = "is missing" if name not in found else "differs from the checksum recorded at commit"
            raise CheckpointDamaged(f"{Path(step_dir) / name} {state}")


# Orbax/TensorStore failures that mean "these bytes are damaged or missing" (a kill mid-write, a disk fault, a
# truncated copy): a checksum mismatch, unparsable JSON metadata, or TensorStore's DATA_LOSS / NOT_FOUND /
# OUT_OF_RANGE statuses, anywhere in the chain of causes (Orbax wraps TensorStore's error of an array read in a
# plain Exception "Encountered error while reading array index").
_DAMAGED_STATUSES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
# ... and those that mean "this checkpoint is fine but holds another model or optimiser" (a changed config).
_INCOMPATIBLE_MESSAGES = ("tree structures do not match", "is not compatible with the stored shape")


def error_chain(error: BaseException) -> list[BaseException]:
    """``error``, then its causes (``__cause__``, else ``__context__``) and the members of exception groups."""
    chain: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is seen for seen in chain):
            continue
        chain.append(current)
        pending += [*getattr(current, "exceptions", ()), current.__cause__ or current.__context__]
    return chain


def restore_failure(error: Exception) -> str:
    """``"damaged"`` (the checkpoint's files are corrupt or partial), ``"incompatible"`` (it holds a state of
    another structure or shape) or ``"other"`` (I/O, sharding, ...: nothing to do with the checkpoint), from
    ``error`` and its causes (:func:`error_chain`)."""
    chain = error_chain(error)
    if any(isinstance(link, (json.JSONDecodeError, CheckpointDamaged)) or str(link).startswith(_DAMAGED_STATUSES)
           for link in chain):
        return "damaged"
    if any(text in str(link) for link in chain for text in _INCOMPATIBLE_MESSAGES):
        return "incompatible"
    return "other"


@contextlib.contextmanager
def _quiet_orbax_coroutines():
    """Drops the "Exception ignored in <coroutine ...>" reports (``sys.unraisablehook``) of Orbax's array reads
    left unawaited when another read of a damaged checkpoint failed first: the failure itself is reported once,
    by :func:`restore_latest`."""
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is None or "orbax" not in code.co_filename:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()  # the coroutines die with the failed read's frames, here rather than at some later moment
        sys.unraisablehook = previous


def failure_reason(error: Exception) -> str:
    """The innermost cause of ``error`` (TensorStore's status, the file that failed its checksum) in one short
    line."""
    innermost = error_chain(error)[-1]
    return f"{type(innermost).__name__}: {' '.join(str(innermost).split())[:300]}"


def try_restore(manager: ocp.CheckpointManager, step: int, abstract):
    """``(restored, None)``, or ``(None, error)`` if step ``step`` cannot be read or fails its checksums."""
    with _quiet_orbax_coroutines():
        try:
            if parallel.is_main_process():
                verify_checksums(Path(manager.directory) / str(step))
            return manager.restore(step, args=ocp.args.Composite(state=restore_state_args(abstract),
                                                                 meta=ocp.args.JsonRestore())), None
        except Exception as error:  # classified by restore_failure: only damage is survivable
            for link in error_chain(error):
                link.__traceback__ = None  # frees the failed read's frames (and their coroutines) now
            return None, error


def restore_latest(manager: ocp.CheckpointManager, state, workdir: Path, factory: Callable[[], ocp.CheckpointManager]):
    """``(manager, state, meta)`` from the newest readable checkpoint, or ``(manager, None, None)`` if none.

    A *damaged* checkpoint (corrupt or partial files, :func:`restore_failure`) is moved to
    ``workdir/checkpoints_corrupt/`` with a warning and the previous one is tried. Any other failure stops with
    a :class:`SentcompError` and moves nothing: a checkpoint of another model or optimiser (the config changed),
    or an I/O or sharding error, says nothing against the checkpoint, and falling back would silently restart
    training. With several processes, process 0 lists the steps, and a step counts as restored only if every
    process restored it (else all fall back, or all stop), so the hosts always continue from the same step.
    """
    abstract = abstract_state(state)
    steps = parallel.main_decides(lambda: sorted(manager.all_steps(), reverse=True))
    for step in steps:
        restored, error = try_restore(manager, step, abstract)
        failure = restore_failure(error) if error is not None else None
        if parallel.any_process(failure in ("incompatible", "other")):
            reason = failure_reason(error) if error is not None else "on another process"
            hint = ("It holds a model or optimiser state of another structure or shape than this config builds: "
                    "resume with the config that wrote it, or use a new workdir." if failure == "incompatible"
                    else "Nothing in the error points to damaged files, so nothing was moved; fix the cause and "
                    "resume.")
            raise ResumeRefused(f"Cannot restore the checkpoint at step {step} in {manager.directory} ({reason}). "
                                f"{hint}")
        if not parallel.any_process(failure == "damaged"):
            return manager, restored["state"], dict(restored["meta"])
        warnings.warn(f"Checkpoint at step {step} in {manager.directory} is damaged ({failure_reason(error)}); "
                      "moving it to checkpoints_corrupt/ and falling back to the previous "
                      "checkpoint." if error is not None else
                      f"Checkpoint at step {step} is damaged on another process; falling back to the previous one.",
                      stacklevel=2)
        manager.close()
        if parallel.is_main_process():
            aside = workdir / "checkpoints_corrupt" / f"{step}-{int(time.time())}"
            aside.parent.mkdir(exist_ok=True)
            shutil.move(str(Path(manager.directory) / str(step)), aside)
        parallel.sync(f"sentcomp_checkpoint_corrupt_{step}")
        manager = factory()
    if steps:
        warnings.warn(f"No intact checkpoint is left in {manager.directory} (the damaged ones are in "
                      f"{workdir / 'checkpoints_corrupt'}): training restarts from step 0.", stacklevel=2)
    return manager, None, None


def resume_settings(config) -> dict[str, Any]:
    """The settings a training run's checkpoints belong to, key by key: ``config`` (a ConfigDict, or an options
    dataclass such as fine-tuning's) flattened to dotted keys (JSON
    values) minus :data:`~results.layout.EXECUTION_KEYS` (e.g. ``mesh``: a checkpoint restores onto any mesh shape)
    and ``resume_may_change`` itself. Stored in every checkpoint's meta and required equal on resume except for the
    keys the resuming config lists in ``resume_may_change`` (:func:`settings_differences`), so
    ``run(config, workdir)`` never continues a run trained under other settings, and a key the user may change
    (``num_steps`` to train longer) is compared only when it is not listed."""
    values = (dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type)
              else json.loads(config.to_json_best_effort()))
    plain = storage.flatten(json.loads(json.dumps(values)))
    return {key: value for key, value in plain.items()
            if not storage.is_under(key, (layout.RESUME_MAY_CHANGE, *layout.EXECUTION_KEYS))}


def settings_differences(recorded: Any, current: Mapping[str, Any], may_change: Sequence[str]) -> list[str]:
    """Lines ``key: recorded -> current`` for the settings (:func:`resume_settings`) that differ, except the keys
    under ``may_change``. ``recorded`` may be the single fingerprint checkpoints held before settings were recorded
    key by key (then only "differ" or not can be told)."""
    if isinstance(recorded, str):
        kept = {key: value for key, value in current.items() if not storage.is_under(key, may_change)}
        return [] if recorded == storage.content_hash(kept) else [
            "settings: this older checkpoint holds a fingerprint of them, not their values"]
    recorded = recorded if isinstance(recorded, Mapping) else {}
    return [f"{key}: {recorded.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r}"
            for key in sorted(recorded.keys() | current.keys())
            if not storage.is_under(key, may_change) and recorded.get(key, "<absent>") != current.get(key, "<absent>")]


def resume(workdir: Path, state, every: int, keep: int, asynchronous: bool = False,
           expected: dict[str, Any] | None = None, may_change: Sequence[str] = ()):
    """``(manager, state, meta)``: a checkpoint manager for ``workdir/checkpoints`` and the newest readable
    checkpoint restored into ``state``'s shapes and shardings (:func:`restore_latest`), with the metrics lines
    logged after it dropped; ``meta`` is None (and ``state`` returned as given) when there is none.

    ``expected`` (e.g. the seeds, and ``"settings"``: :func:`resume_settings`) must equal the same entries of the
    checkpoint's meta (the settings except the keys under ``may_change``), else resuming would continue another
    run: :class:`ResumeRefused` says so, before anything in the workdir changed.
    """
    factory = functools.partial(checkpoint_manager, workdir, every, keep, asynchronous)
    manager, restored, meta = restore_latest(factory(), state, workdir, factory)
    if restored is None:
        if parallel.is_main_process() and (workdir / layout.METRICS_FILE).exists():
            truncate_metrics(workdir, 0)  # a run that died before its first checkpoint starts again from step 0
        return manager, state, None
    expected = dict(expected or {})
    differences = (settings_differences(meta.get("settings"), expected.pop("settings"), may_change)
                   if "settings" in expected else [])
    differences += [f"{key}: {meta.get(key)!r} -> {value!r}" for key, value in expected.items()
                    if meta.get(key) != value]
    if differences:
        manager.close()
        raise ResumeRefused(f"The checkpoint in {workdir} was trained with other settings ({'; '.join(differences)}): "
                            "resume with the config that wrote it, list the keys allowed to change with "
                            "--resume_may_change=key1,key2, or use a new workdir.")
    if parallel.is_main_process():
        truncate_metrics(workdir, int(meta["step"]))
    return manager, restored, meta
