"""The training machinery shared by pretraining, fine-tuning and the synthetic-language runs.

Losses (``LOSSES``: cross-entropy and the paper's Quad, :mod:`sentcomp.kernels`), the optimiser (optax AdamW
with warmup and decay, clipping, optionally frozen Φ), the jitted train and eval steps (data-parallel, the
state replicated or FSDP-sharded, :mod:`sentcomp.parallel`) and the validation losses (:func:`validation_losses`,
also :mod:`sentcomp.programs.lm_loss`'s), the data plan (which stream positions each step reads on this process),
Orbax checkpoints that resume exactly (a corrupt latest checkpoint is set aside, and one written under one mesh
restores onto another) and the metrics log: ``metrics.jsonl``, mirrored live as TensorBoard scalars in
``workdir/tensorboard/`` and, when ``SENTCOMP_WANDB_PROJECT`` is set and ``wandb`` installed, to Weights & Biases
(:func:`append_metrics`). :mod:`sentcomp.programs.pretrain` documents how a run uses them.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import scalar

from sentcomp import kernels, parallel
from sentcomp.data import corpora
from sentcomp.errors import ResumeRefused, SentcompError
from sentcomp.models.base import cast_floats
from sentcomp.results import plots, storage

LOSSES: dict[str, Callable] = {"xent": kernels.xent_loss, "quad": kernels.quad_loss}
DECAYS = ("cosine", "linear")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT_VARIABLE = "SENTCOMP_WANDB_PROJECT"


class TrainingDiverged(SentcompError):
    """The loss (or the parameters) became NaN/inf; the last good checkpoint is kept."""


# -------------------------------------------------------------------------------------------- the optimiser


def learning_rate_schedule(opt, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``opt.learning_rate`` over ``opt.warmup_steps``, then cosine or linear decay to
    ``opt.learning_rate · opt.end_lr_fraction`` at ``num_steps``."""
    if opt.decay not in DECAYS:
        raise SentcompError(f"optimizer.decay must be one of {DECAYS}, got {opt.decay!r}.")
    peak, warmup = opt.learning_rate, min(opt.warmup_steps, num_steps)
    end, decay_steps = peak * opt.end_lr_fraction, max(num_steps - warmup, 1)
    decay = (optax.cosine_decay_schedule(peak, decay_steps, opt.end_lr_fraction) if opt.decay == "cosine"
             else optax.linear_schedule(peak, end, decay_steps))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), decay], [warmup])


def make_optimizer(opt, num_steps: int, params, frozen: str | None = None) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decay on ≥2-D weights); the updates of the top-level parameter ``frozen``
    (e.g. the model's Φ, to train with a fixed Φ) are zeroed."""
    adamw = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(learning_rate_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)),
    )
    if frozen is None:
        return adamw
    if frozen not in params:
        raise SentcompError(f"Cannot freeze {frozen!r}: the parameters' top-level keys are {sorted(params)}.")
    labels = {key: jax.tree.map(lambda _, k=key: "frozen" if k == frozen else "train", value)
              for key, value in params.items()}
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------------------------- the step


# The loss's matmul precision per backend when config.matmul_precision is "auto": TF32-class products on GPU
# (Ampere+ tensor cores) and 3 bf16 passes on TPU instead of full float32; CPU products are float32 whatever the
# setting. The statistics stay float32 whatever it is (docs/precision.md, "Training").
TRAINING_PRECISION_BY_BACKEND = {"gpu": "high", "tpu": "high", "cpu": "highest"}


def training_precision(setting: str, backend: str | None = None):
    """The loss kernels' matmul precision for ``setting``: ``"auto"`` picks
    :data:`TRAINING_PRECISION_BY_BACKEND` for ``backend`` (default: JAX's), anything else must be a precision
    :func:`sentcomp.kernels.check_precision` accepts."""
    if setting == "auto":
        return TRAINING_PRECISION_BY_BACKEND.get(backend or jax.default_backend(), kernels.DEFAULT_PRECISION)
    try:
        return kernels.check_precision(setting)
    except ValueError as error:
        raise SentcompError(f"config.matmul_precision: {error} Or 'auto' (per backend: "
                            f"{TRAINING_PRECISION_BY_BACKEND}).") from None


def batch_loss(loss_name: str, hidden_fn, phi_fn, params, tokens: jax.Array, mask: jax.Array,
               compute_dtype, precision=kernels.DEFAULT_PRECISION) -> jax.Array:
    """The training objective on blocks ``tokens [B, T+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), averaged
    over the target positions ``mask [B, T]`` marks; model and loss run in ``compute_dtype``, the loss's matrix
    products at ``precision`` (its log Z and softmax statistics accumulate in float32 whatever it is)."""
    params = cast_floats(params, compute_dtype)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = hidden_fn(params, inputs, jnp.ones_like(inputs))
    return LOSSES[loss_name](hidden, phi_fn(params), targets, mask, precision=precision)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(loss_name: str, hidden_fn, phi_fn, optimizer, compute_dtype, mesh,
                    precision=kernels.DEFAULT_PRECISION):
    """The jitted ``(state, tokens [micro, accum, T+1]) -> (state, metrics)``: the mean gradient of the
    ``accum`` micro-batches (each sharded over all the mesh's devices), one optimiser update. ``hidden_fn`` and
    ``phi_fn`` are the model's (:class:`sentcomp.models.LanguageModel`); ``precision``: of the loss's matrix
    products (:func:`training_precision`); :func:`make_batch_train_step` for the layouts."""
    def loss_fn(params, micro_tokens):
        mask = jnp.ones(micro_tokens.shape[:1] + (micro_tokens.shape[1] - 1,), bool)
        return batch_loss(loss_name, hidden_fn, phi_fn, params, micro_tokens, mask, compute_dtype,
                          precision=precision)

    return make_batch_train_step(loss_fn, optimizer, mesh)


def make_batch_train_step(loss_fn, optimizer, mesh):
    """The jitted ``(state, batch) -> (state, metrics)`` for any objective ``loss_fn(params, micro_batch)``:
    ``batch`` is a pytree whose leaves are ``[micro, accum, ...]`` (e.g. tokens, or tokens and a teacher's
    targets); the mean gradient of the ``accum`` micro-batches (each sharded over all the mesh's devices), one
    optimiser update.

    The state keeps the layout it comes with (:func:`initial_state`, :func:`resume`: :func:`parallel.state_shardings`
    on ``mesh``) and the new state, like the gradients, is pinned to that layout, so with an fsdp axis the
    parameters and optimiser state stay sharded: XLA gathers each weight where it is used and reduce-scatters
    its gradient."""
    grad_fn = jax.value_and_grad(loss_fn)

    def step(state, batch):
        def accumulate(carry, micro_batch):
            loss, grads = grad_fn(state["params"], micro_batch)
            return jax.tree.map(jnp.add, carry, (loss, parallel.constrain_state(grads, mesh))), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batch))
        accum = jax.tree.leaves(batch)[0].shape[1]
        loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": all_finite(params)}
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return parallel.constrain_state(new_state, mesh), metrics

    # the state: None = the layout of the arrays passed in (initial_state's, resume's)
    return jax.jit(step, in_shardings=(None, parallel.batch_sharding(mesh)),
                   out_shardings=(None, parallel.replicated(mesh)), donate_argnums=0)


def initial_state(params, optimizer, mesh) -> dict[str, Any]:
    """``{"params", "opt_state", "step": 0}`` laid out on ``mesh`` by :func:`parallel.state_shardings`: replicated
    on a data-only mesh, large leaves split over the fsdp axis otherwise."""
    params = parallel.shard_state(params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=parallel.state_shardings(
        mesh, jax.eval_shape(optimizer.init, params)))(params)
    return {"params": params, "opt_state": opt_state, "step": parallel.replicate(jnp.zeros((), jnp.int32), mesh)}


def make_eval_step(hidden_fn, phi_fn, compute_dtype, mesh):
    """The jitted ``(params, tokens [B, T+1], mask [B, T]) -> {xent, quad: summed loss, count}``."""

    def evaluate(params, tokens, mask):
        params = cast_floats(params, compute_dtype)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        hidden = hidden_fn(params, inputs, jnp.ones_like(inputs))
        phi, weights = phi_fn(params), mask.astype(jnp.float32)
        return {
            "xent": jnp.sum(weights * kernels.xent_per_position(hidden, phi, targets)),
            "quad": jnp.sum(weights * kernels.quad_per_position(hidden, phi, targets)),
            "count": jnp.sum(weights),
        }

    batch = parallel.batch_sharding(mesh)  # params: None = their own layout (replicated or fsdp-sharded)
    return jax.jit(evaluate, in_shardings=(None, batch, batch), out_shardings=parallel.replicated(mesh))


def validation_batches(blocks: np.ndarray, num_blocks: int, batch_size: int, host_rows: np.ndarray):
    """The first ``num_blocks`` validation blocks (all if ≤ 0) in batches of ``batch_size`` (padded rows masked):
    this process's rows of each, as ``(tokens, mask)``."""
    blocks = blocks[:num_blocks] if num_blocks > 0 else blocks
    batches = []
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start:start + batch_size]
        tokens = np.zeros((batch_size, blocks.shape[1]), np.int32)
        mask = np.zeros((batch_size, blocks.shape[1] - 1), bool)
        tokens[:len(chunk)], mask[:len(chunk)] = chunk, True
        batches.append((tokens[host_rows], mask[host_rows]))
    return batches


def validation_losses(eval_step, params, batches, mesh) -> dict[str, float]:
    """Validation cross-entropy and Quad loss: means over every counted position of ``batches``."""
    totals = {"xent": 0.0, "quad": 0.0, "count": 0.0}
    for tokens, mask in batches:
        out = parallel.fetch(eval_step(params, *parallel.global_batch((tokens, mask), mesh)))
        totals = {key: totals[key] + float(out[key]) for key in totals}
    count = max(totals["count"], 1.0)
    return {"val_xent": totals["xent"] / count, "val_quad": totals["quad"] / count}


# -------------------------------------------------------------------------------------------------- the data


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """Which rows of each step's global batch this process loads, and from where."""

    blocks: np.ndarray  # train blocks [N, T+1]
    micro_batch: int
    grad_accum: int
    seed: int
    host_rows: np.ndarray  # this process's rows of a micro-batch

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    def position(self, step: int) -> dict[str, int]:
        """How far through the data a run is after ``step`` steps."""
        consumed = step * self.global_batch
        return {"blocks_consumed": consumed, "epoch": consumed // len(self.blocks),
                "offset": consumed % len(self.blocks)}

    def local_indices(self, step: int) -> np.ndarray:
        """The block indices of this process's rows of step ``step``'s batch, ``[local micro rows, accum]``: stream
        position ``step·B + k·micro + r`` for micro-batch ``k`` and row ``r``."""
        positions = (step * self.global_batch + np.arange(self.grad_accum)[None, :] * self.micro_batch
                     + self.host_rows[:, None])
        return corpora.block_indices(positions.reshape(-1), len(self.blocks), self.seed).reshape(positions.shape)

    def local_tokens(self, step: int) -> np.ndarray:
        """This process's rows of step ``step``'s batch, ``[local micro rows, accum, T+1]``
        (:meth:`local_indices`)."""
        return self.blocks[self.local_indices(step)]


# ------------------------------------------------------------------------------------------- checkpointing


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


def checkpoint_manager(workdir: Path, every: int, keep: int, asynchronous: bool) -> ocp.CheckpointManager:
    """The run's Orbax manager for ``workdir/checkpoints`` (write failures reported as :class:`_CheckpointManager`
    says)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                           enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True)
    return _CheckpointManager(workdir / "checkpoints", options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state, meta: dict[str, Any]) -> None:
    """Saves ``state`` and ``meta`` (with its ``"step"``) as a checkpoint; a write that fails for lack of space or
    permission raises :class:`SentcompError` naming the cause, the last complete checkpoint kept."""
    step = int(meta["step"])
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
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


def _try_restore(manager: ocp.CheckpointManager, step: int, abstract):
    """``(restored, None)``, or ``(None, error)`` if step ``step`` cannot be read or fails its checksums."""
    with _quiet_orbax_coroutines():
        try:
            if parallel.is_main_process():
                verify_checksums(Path(manager.directory) / str(step))
            return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
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
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    steps = parallel.main_decides(lambda: sorted(manager.all_steps(), reverse=True))
    for step in steps:
        restored, error = _try_restore(manager, step, abstract)
        failure = restore_failure(error) if error is not None else None
        if parallel.any_process(failure in ("incompatible", "other")):
            reason = failure_reason(error) if error is not None else "on another process"
            hint = ("It holds a model or optimiser state of another structure or shape than this config builds: "
                    "resume with the config that wrote it, or use a new workdir. (GPT-2 checkpoints written before "
                    "GPT-2's layers were stacked hold blocks h_0, h_1, ...: sentcomp.models.gpt2.stack_layers "
                    "converts their parameters.)" if failure == "incompatible"
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


RESUME_MAY_CHANGE = "resume_may_change"


def resume_settings(config) -> dict[str, Any]:
    """The settings a training run's checkpoints belong to, key by key: ``config`` flattened to dotted keys (JSON
    values) minus :data:`~results.storage.EXECUTION_KEYS` (e.g. ``mesh``: a checkpoint restores onto any mesh shape)
    and ``resume_may_change`` itself. Stored in every checkpoint's meta and required equal on resume except for the
    keys the resuming config lists in ``resume_may_change`` (:func:`settings_differences`), so
    ``run(config, workdir)`` never continues a run trained under other settings, and a key the user may change
    (``num_steps`` to train longer) is compared only when it is not listed."""
    plain = storage.flatten(json.loads(config.to_json_best_effort()))
    return {key: value for key, value in plain.items()
            if not storage.is_under(key, (RESUME_MAY_CHANGE, *storage.EXECUTION_KEYS))}


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
        if parallel.is_main_process() and (workdir / METRICS_FILE).exists():
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


# ------------------------------------------------------------------------------------------------ metrics


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl``; a torn last line (a kill mid-append) is skipped with a warning."""
    return storage.read_json_lines(workdir / METRICS_FILE)


def truncate_metrics(workdir: Path, step: int) -> None:
    """Drops the metrics lines logged after ``step`` (by a run that died before its next checkpoint). The next
    TensorBoard event file of ``workdir`` then starts with a purge at ``step + 1`` (what tensorboardX's
    ``SummaryWriter(purge_step=step + 1)`` writes), so TensorBoard hides the dropped steps' old values."""
    kept = [row for row in read_metrics(workdir) if row["step"] <= step]
    storage.write_text(workdir / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in kept))
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
    storage.append_json_line(workdir / METRICS_FILE, row)
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
        _EVENT_LOGS[key] = _EventLog(Path(workdir) / TENSORBOARD_DIR, _PURGE_STEPS.pop(key, None))
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
