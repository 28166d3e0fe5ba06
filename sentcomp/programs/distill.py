"""One student distilled from a teacher's stored distributions (or trained on the plain next word), with exact ε,
the excess Quad loss and the theorem's bound measured at chosen steps (sentcomp.teacher; docs/teacher.md).

``run(config, workdir)`` reads the teacher-targets run ``config.targets`` (sentcomp.programs.teacher_targets:
corpus blocks, sparse targets, the teacher's Φ and features on validation and task contexts, the task's
naturalness frontier) and trains a random decoder ``config.model`` with the teacher's tokenizer on the same
train blocks with ``config.objective``:

* ``soft_xent``: ``E_s[H(p̃_T(.|s), p_f(.|s))]`` (:func:`sentcomp.kernels.soft_xent_loss`);
* ``soft_quad``: ``E_s[−f(s)ᵀΦp̃_T + ½‖Φᵀf(s)‖²]`` (:func:`sentcomp.kernels.soft_quad_loss`);
* ``xent`` / ``quad``: the paper's objectives on the observed next word (:data:`sentcomp.training.steps.LOSSES`).

The loss's matrix products run at ``config.matmul_precision`` (``"auto"``: per backend,
:func:`sentcomp.training.steps.training_precision`). The step, optimiser, data order, checkpoints and metrics log
are :mod:`sentcomp.training`'s (the pretraining
program's machinery; the steps run in :func:`sentcomp.training.loop.train_loop`, whose divergence check stops a
non-finite run with ``TrainingDiverged``, the last good checkpoint kept): step ``t`` reads the blocks at stream
positions ``t·B ..`` of ``config.data.seed``, so every student with the same seed and batch size sees the same
blocks in the same order.

**At each step of ``config.eval_steps``** (0, the untrained student, included; and the last step) one line of
``metrics.jsonl`` gets, on the first ``eval_blocks`` validation blocks (held-out text): ``epsilon``
(``KL(p_T ‖ p_f)`` exact, mean over blocks with a 95% interval over blocks) and ``quad_excess``
(``½‖Φᵀ(f − f*)‖²``, the student's Φ); ``val_xent`` / ``val_quad`` on the next word; ``val_loss``, the
objective's own validation loss (ε for ``soft_xent``, the excess Quad loss for ``soft_quad``: each equals the
soft loss minus a constant of the teacher; ``val_xent`` / ``val_quad`` for the hard objectives), the only number
for choosing a learning rate; and ``bound``: :func:`sentcomp.teacher.bound_check` on the task's contexts (γ = 1,
exact inequality); the rows after step 0 also hold the training loop's ``train_loss``, ``tokens_per_s``, ``mfu``
and ``train_seconds``. The weights are written to ``snapshots/step_<N>/`` (HF layout + tokenizer) for the Table-1
stages, and a checkpoint is saved. Re-running resumes from the last checkpoint; an evaluation already logged is
not repeated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import PreTrainedTokenizerFast

from sentcomp import kernels, models, parallel
from sentcomp import teacher as teacher_lib
from sentcomp.errors import SentcompError
from sentcomp.features import extract_features
from sentcomp.models.base import COMPUTE_DTYPES, cast_floats
from sentcomp.results import layout, storage
from sentcomp.training import checkpoints, loop, steps, throughput, tracking

SOFT_LOSSES = {"soft_xent": kernels.soft_xent_loss, "soft_quad": kernels.soft_quad_loss}
OBJECTIVES = (*SOFT_LOSSES, *steps.LOSSES)
SNAPSHOTS = "snapshots"


def snapshot_dir(workdir: Path, step: int) -> Path:
    return Path(workdir) / SNAPSHOTS / f"step_{step}"


def build_student(config, tokenizer):
    """A random decoder of shape ``config.model`` (pretraining's model keys: family, ``n_layer``, ``n_embd``,
    ``n_head``, ``n_positions``, ``intermediate_size``, ``tie_word_embeddings``; the family's
    :func:`sentcomp.models.hf_model_config`) with ``tokenizer``."""
    lm = models.init(config.model.family, models.hf_model_config(config.model, len(tokenizer)),
                     jax.random.key(config.seed), tokenizer=tokenizer)
    return lm.replace(name=f"student-{config.objective}")


def soft_train_step(objective, lm, optimizer, compute_dtype, mesh, precision=kernels.DEFAULT_PRECISION):
    """The jitted train step on ``(tokens, ids, probs)`` batches for a soft objective, the loss's matrix products
    at ``precision`` (:func:`sentcomp.training.steps.training_precision`)."""
    loss = SOFT_LOSSES[objective]

    def loss_fn(params, batch):
        tokens, ids, probs = batch
        params = cast_floats(params, compute_dtype)
        inputs = tokens[:, :-1]
        hidden = lm.hidden_fn(params, inputs, jnp.ones_like(inputs))
        return loss(hidden, lm.phi_fn(params), ids, probs, jnp.ones(inputs.shape, bool), precision=precision)

    return steps.make_batch_train_step(loss_fn, optimizer, mesh)


def block_hidden(lm, params, blocks: np.ndarray, batch: int) -> np.ndarray:
    """The student's ``f(s)`` at every input position of ``blocks``: ``[n, T, d]``."""
    hidden = jax.jit(lm.hidden_fn)
    out = []
    for start in range(0, len(blocks), batch):
        inputs = jnp.asarray(blocks[start:start + batch, :-1])
        out.append(np.asarray(hidden(params, inputs, jnp.ones_like(inputs)), np.float32))
    return np.concatenate(out)


def evaluate(config, lm, params, teacher, eval_step, val_batches, mesh) -> dict:
    """The measurements of one step (module docstring)."""
    student = lm.replace(params=parallel.fetch(params))
    phi = np.asarray(student.phi, np.float32)
    hidden = block_hidden(student, student.params, teacher["validation_blocks"], config.eval_batch_size)
    divergences = teacher_lib.heldout_divergences(hidden, phi, teacher["validation_hidden"], teacher["phi"])
    task_hidden = extract_features(student, list(teacher["task_texts"]), ("f",), prompt=str(teacher["prompt"]),
                                   max_length=config.task_max_length, batch_size=config.eval_batch_size,
                                   progress=False)["f"]
    frontier = {"max_norm": teacher["frontier_max_norm"], "word_weights": teacher["frontier_word_weights"]}
    row: dict[str, Any] = {"epsilon": teacher_lib.per_block_estimate(divergences["kl"]),
           "quad_excess": teacher_lib.per_block_estimate(divergences["quad_excess"]),
           **steps.validation_losses(eval_step, params, val_batches, mesh),
           "bound": teacher_lib.bound_check(task_hidden, phi, teacher["task_hidden"], teacher["phi"],
                                            teacher["task_labels"], frontier)}
    row["val_loss"] = {"soft_xent": row["epsilon"]["mean"], "soft_quad": row["quad_excess"]["mean"],
                       "xent": row["val_xent"], "quad": row["val_quad"]}[config.objective]
    return row


def save_snapshot(lm, params, workdir: Path, step: int) -> None:
    if parallel.is_main_process():
        trained = lm.replace(params=parallel.fetch(params))
        models.save_hf(trained, snapshot_dir(workdir, step))
        trained.tokenizer.save_pretrained(str(snapshot_dir(workdir, step)))


def read_teacher(targets_dir: Path) -> dict:
    """The teacher-targets run's arrays and results (module docstring of sentcomp.programs.teacher_targets)."""
    if not (targets_dir / "results.json").exists():
        raise SentcompError(f"{targets_dir} holds no finished teacher-targets run (results.json): run that stage "
                            "first (config.targets names its workdir).")
    with np.load(targets_dir / "teacher.npz", allow_pickle=False) as arrays:
        teacher = dict(arrays)
    results = teacher_lib.read_json(targets_dir / "results.json")
    return {**teacher, "prompt": results["prompt"], "results": results}


def check_config(config) -> None:
    if config.objective not in OBJECTIVES:
        raise SentcompError(f"config.objective must be one of {OBJECTIVES}, got {config.objective!r}.")
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise SentcompError(f"config.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}.")
    for key in ("num_steps", "batch_size", "grad_accum", "eval_batch_size"):
        if config[key] < 1:
            raise SentcompError(f"config.{key} must be ≥ 1, got {config[key]}.")
    if config.batch_size % config.grad_accum:
        raise SentcompError(f"config.batch_size={config.batch_size} must be a multiple of grad_accum.")
    steps.training_precision(config.get("matmul_precision", "auto"))
    if any(step < 0 or step > config.num_steps for step in config.eval_steps):
        raise SentcompError(f"config.eval_steps must lie in [0, num_steps={config.num_steps}]; got "
                            f"{tuple(config.eval_steps)}.")


def run(config, workdir) -> dict:
    check_config(config)
    workdir = Path(workdir).resolve()
    targets_dir = Path(config.targets).resolve()
    teacher = read_teacher(targets_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(targets_dir / "tokenizer"))
    lm = build_student(config, tokenizer)
    if teacher["phi"].shape[0] != lm.config.vocab_size:
        raise SentcompError(f"The teacher has {teacher['phi'].shape[0]} words and the student "
                            f"{lm.config.vocab_size}: the student must use the teacher's tokenizer.")
    mesh = parallel.make_mesh(config.get("mesh"))
    micro_batch = config.batch_size // config.grad_accum
    if micro_batch % mesh.size:
        raise SentcompError(f"Each micro-batch ({micro_batch} blocks) must split evenly over {mesh.size} devices.")
    soft = config.objective in SOFT_LOSSES
    targets = teacher_lib.read_targets(targets_dir / teacher["results"]["targets_folder"]) if soft else None
    train = teacher["train_blocks"]
    plan = steps.DataPlan(train, micro_batch, config.grad_accum, config.data.seed,
                          parallel.host_row_indices(micro_batch, mesh))
    eval_batch = parallel.pad_to_multiple(config.eval_batch_size, mesh.size)
    val_batches = steps.validation_batches(teacher["validation_blocks"], 0, eval_batch,
                                           parallel.host_row_indices(eval_batch, mesh))

    optimizer = steps.make_optimizer(config.optimizer, config.num_steps, lm.params)
    seeds = {"seed": config.seed, "data_seed": config.data.seed, "settings": checkpoints.resume_settings(config)}
    manager, state, meta = checkpoints.resume(workdir, steps.initial_state(lm.params, optimizer, mesh),
                                              config.checkpoint.every, config.checkpoint.keep,
                                              config.checkpoint.asynchronous, expected=seeds)
    start = int(parallel.fetch(state["step"]))
    compute_dtype = COMPUTE_DTYPES[config.compute_dtype]
    precision = steps.training_precision(config.get("matmul_precision", "auto"))
    train_step = (soft_train_step(config.objective, lm, optimizer, compute_dtype, mesh, precision) if soft
                  else steps.make_train_step(config.objective, lm.hidden_fn, lm.phi_fn, optimizer, compute_dtype,
                                             mesh, precision=precision))
    eval_step = steps.make_eval_step(lm.hidden_fn, lm.phi_fn, compute_dtype, mesh)
    eval_steps = sorted({*config.eval_steps, config.num_steps})
    seq_len = train.shape[1] - 1
    tokens_per_step = config.batch_size * seq_len
    flops_per_step = tokens_per_step * throughput.lm_flops_per_token(
        lm, seq_len, output_projection=steps.computes_word_logits(config.objective))

    def batch(step: int) -> loop.Batch:
        indices = plan.local_indices(step)
        local = train[indices] if targets is None else (train[indices], targets["ids"][indices].astype(np.int32),
                                                        targets["probs"][indices])  # None unless soft
        return loop.Batch((parallel.global_batch(local, mesh),), tokens_per_step, flops_per_step)

    def evaluate_now(step: int, params) -> dict:
        row = {"tokens": step * tokens_per_step, **evaluate(config, lm, params, teacher, eval_step, val_batches, mesh)}
        save_snapshot(lm, params, workdir, step)
        return row

    checkpoint_meta = lambda step: {"step": step, **plan.position(step), **seeds}  # noqa: E731
    evaluated = {row["step"] for row in tracking.read_metrics(workdir) if "epsilon" in row}
    if start == 0 and 0 in eval_steps and 0 not in evaluated:  # the untrained student: no training row
        tracking.append_metrics(workdir, {"step": 0, **evaluate_now(0, state["params"])})
        checkpoints.save_checkpoint(manager, state, checkpoint_meta(0))
    loop.train_loop(
        state, train_step, batch, start, config.num_steps,
        [loop.at_steps(eval_steps, lambda done: evaluate_now(done.step, done.state["params"]))],
        workdir=workdir, name=f"distill {config.objective}", progress=config.progress,
        checkpointing=loop.Checkpointing(manager, checkpoint_meta, every=config.checkpoint.every, with_rows=True),
        hardware=loop.Throughput(throughput.peak_flops(jax.local_devices()[0]), mesh.size),
        last_saved=start if meta is not None else None,
        hint=f"Lower config.optimizer.learning_rate (now {config.optimizer.learning_rate}).")
    rows = [row for row in tracking.read_metrics(workdir) if "epsilon" in row] if parallel.is_main_process() else [{}]
    final = rows[-1]
    results = {"objective": config.objective, "steps": config.num_steps, "val_loss": final.get("val_loss"),
               "epsilon": final.get("epsilon", {}).get("mean"), "quad_excess": final.get("quad_excess", {}).get("mean"),
               "bound_holds_at_every_step": all(row["bound"]["holds"] for row in rows),
               "snapshots": {str(row["step"]): str(snapshot_dir(workdir, row["step"])) for row in rows}}
    if parallel.is_main_process():
        storage.write_json(workdir / layout.RESULTS_FILE, results)
    return {key: results[key] for key in ("val_loss", "epsilon", "quad_excess", "bound_holds_at_every_step")}
