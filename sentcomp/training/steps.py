"""The training step and what it needs: the losses (``LOSSES``: cross-entropy and the paper's Quad,
:mod:`sentcomp.kernels`), the optimiser (optax AdamW with warmup and decay, clipping, optionally frozen Φ), the
loss's matmul precision, the jitted train and eval steps (data-parallel, the state replicated or FSDP-sharded,
:mod:`sentcomp.parallel`), the validation losses (:func:`validation_losses`, also
:mod:`sentcomp.programs.lm_loss`'s) and the data plan (which stream positions each step reads on this process).
:mod:`sentcomp.training.loop` runs the steps; :mod:`sentcomp.programs.pretrain` documents how a run uses them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sentcomp import kernels, parallel
from sentcomp.data import corpora
from sentcomp.errors import SentcompError
from sentcomp.models.base import cast_floats

LOSSES: dict[str, Callable] = {"xent": kernels.xent_loss, "quad": kernels.quad_loss}
DECAYS = ("cosine", "linear")


# -------------------------------------------------------------------------------------------- the optimiser


def computes_word_logits(objective: str) -> bool:
    """Whether a training objective computes the word logits ``Φᵀf`` at every position (cross-entropy's ``log Z``,
    streamed over V), which the model FLOPs behind its MFU count; the Quad objectives (``quad``, ``soft_quad``)
    use ``½fᵀ(ΦᵀΦ)f`` instead (one ``d × d`` Gram per step), so their FLOPs leave the output projection out
    (:func:`sentcomp.training.throughput.lm_flops_per_token`)."""
    return objective not in ("quad", "soft_quad")


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
                   out_shardings=(None, parallel.replicated(mesh)), donate_argnums=state_donation(mesh))


def state_donation(mesh) -> tuple[int, ...]:
    """The train step's donated arguments: the state (its buffers reused for the new state, halving the state's
    peak memory) on GPU and TPU; nothing on CPU. On XLA:CPU (jaxlib 0.10.2) a donating step that JAX's persistent
    compilation cache loads from disk aborts the process when it runs on a state restored from a checkpoint onto
    another mesh (``tests/test_fsdp.py``'s mesh-change test: it passes with a fresh cache and aborts with "Fatal
    Python error: Aborted" on the second run; without donation it passes both times)."""
    return () if mesh.devices.flat[0].platform == "cpu" else (0,)


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
