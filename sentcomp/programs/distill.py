"""One student distilled from a teacher's stored distributions (or trained on the plain next word), with exact ε,
the excess Quad loss and the theorem's bound measured at chosen steps (sentcomp.teacher; docs/teacher.md).

``run(config, workdir)`` reads the teacher-targets run ``config.targets`` (sentcomp.programs.teacher_targets:
corpus blocks, sparse targets, the teacher's Φ and features on validation and task contexts, the task's
naturalness frontier) and trains a random decoder ``config.model`` with the teacher's tokenizer on the same
train blocks with ``config.objective``:

* ``soft_xent``: ``E_s[H(p̃_T(.|s), p_f(.|s))]`` (:func:`sentcomp.kernels.soft_xent_loss`);
* ``soft_quad``: ``E_s[−f(s)ᵀΦp̃_T + ½‖Φᵀf(s)‖²]`` (:func:`sentcomp.kernels.soft_quad_loss`);
* ``xent`` / ``quad``: the paper's objectives on the observed next word (:data:`sentcomp.training.LOSSES`).

The step, optimiser, data order, checkpoints and metrics log are :mod:`sentcomp.training`'s (the pretraining
program's machinery): step ``t`` reads the blocks at stream positions ``t·B ..`` of ``config.data.seed``, so every
student with the same seed and batch size sees the same blocks in the same order.

**At each step of ``config.eval_steps``** (0, the untrained student, included; and the last step) one line of
``metrics.jsonl`` gets, on the first ``eval_blocks`` validation blocks (held-out text): ``epsilon``
(``KL(p_T ‖ p_f)`` exact, mean over blocks with a 95% interval over blocks) and ``quad_excess``
(``½‖Φᵀ(f − f*)‖²``, the student's Φ); ``val_xent`` / ``val_quad`` on the next word; ``val_loss``, the
objective's own validation loss (ε for ``soft_xent``, the excess Quad loss for ``soft_quad``: each equals the
soft loss minus a constant of the teacher; ``val_xent`` / ``val_quad`` for the hard objectives), the only number
for choosing a learning rate; and ``bound``: :func:`sentcomp.teacher.bound_check` on the task's contexts (γ = 1,
exact inequality). The weights are written to ``snapshots/step_<N>/`` (HF layout + tokenizer) for the Table-1
stages, and a checkpoint is saved. Re-running resumes from the last checkpoint; an evaluation already logged is
not repeated.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from sentcomp import kernels, models, parallel
from sentcomp import teacher as teacher_lib
from sentcomp.errors import SentcompError
from sentcomp.features import extract_features
from sentcomp.models.base import COMPUTE_DTYPES, cast_floats
from sentcomp.results import storage
from sentcomp.training import (
    LOSSES,
    DataPlan,
    TrainingDiverged,
    append_metrics,
    initial_state,
    make_batch_train_step,
    make_eval_step,
    make_optimizer,
    make_train_step,
    read_metrics,
    resume,
    resume_settings,
    save_checkpoint,
    validation_batches,
    validation_losses,
)

SOFT_LOSSES = {"soft_xent": kernels.soft_xent_loss, "soft_quad": kernels.soft_quad_loss}
OBJECTIVES = (*SOFT_LOSSES, *LOSSES)
RESULTS_FILE = "results.json"
SNAPSHOTS = "snapshots"


def snapshot_dir(workdir: Path, step: int) -> Path:
    return Path(workdir) / SNAPSHOTS / f"step_{step}"


def build_student(config, tokenizer):
    """A random decoder of shape ``config.model`` (family, layers, width, heads, context) with ``tokenizer``."""
    shape = config.model
    hf_config = {"vocab_size": len(tokenizer), "hidden_size": shape.n_embd, "num_hidden_layers": shape.n_layer,
                 "num_attention_heads": shape.n_head, "num_key_value_heads": shape.n_head,
                 "intermediate_size": shape.intermediate_size or 4 * shape.n_embd,
                 "max_position_embeddings": shape.n_positions, "tie_word_embeddings": shape.tie_word_embeddings}
    lm = models.init(shape.family, hf_config, jax.random.key(config.seed), tokenizer=tokenizer)
    return lm.replace(name=f"student-{config.objective}")


def soft_train_step(objective, lm, optimizer, compute_dtype, mesh):
    """The jitted train step on ``(tokens, ids, probs)`` batches for a soft objective."""
    loss = SOFT_LOSSES[objective]

    def loss_fn(params, batch):
        tokens, ids, probs = batch
        params = cast_floats(params, compute_dtype)
        inputs = tokens[:, :-1]
        hidden = lm.hidden_fn(params, inputs, jnp.ones_like(inputs))
        return loss(hidden, lm.phi_fn(params), ids, probs, jnp.ones(inputs.shape, bool))

    return make_batch_train_step(loss_fn, optimizer, mesh)


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
           **validation_losses(eval_step, params, val_batches, mesh),
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
    plan = DataPlan(train, micro_batch, config.grad_accum, config.data.seed,
                    parallel.host_row_indices(micro_batch, mesh))
    eval_batch = parallel.pad_to_multiple(config.eval_batch_size, mesh.size)
    val_batches = validation_batches(teacher["validation_blocks"], 0, eval_batch,
                                     parallel.host_row_indices(eval_batch, mesh))

    optimizer = make_optimizer(config.optimizer, config.num_steps, lm.params)
    seeds = {"seed": config.seed, "data_seed": config.data.seed, "settings": resume_settings(config)}
    manager, state, meta = resume(workdir, initial_state(lm.params, optimizer, mesh), config.checkpoint.every,
                                  config.checkpoint.keep, config.checkpoint.asynchronous, expected=seeds)
    start = int(parallel.fetch(state["step"]))
    compute_dtype = COMPUTE_DTYPES[config.compute_dtype]
    train_step = (soft_train_step(config.objective, lm, optimizer, compute_dtype, mesh) if soft
                  else make_train_step(config.objective, lm.hidden_fn, lm.phi_fn, optimizer, compute_dtype, mesh))
    eval_step = make_eval_step(lm.hidden_fn, lm.phi_fn, compute_dtype, mesh)
    eval_steps = sorted({*config.eval_steps, config.num_steps})
    evaluated = {row["step"] for row in read_metrics(workdir) if "epsilon" in row}
    losses: list[float] = []
    seconds = 0.0

    def local_batch(step):
        indices = plan.local_indices(step)
        tokens = train[indices]
        if not soft:
            return tokens
        return tokens, targets["ids"][indices].astype(np.int32), targets["probs"][indices]

    bar = tqdm(total=config.num_steps, initial=start, desc=f"distill {config.objective}", unit="step",
               disable=not (config.progress and parallel.is_main_process()))
    for step in range(start, config.num_steps + 1):
        if step in eval_steps and step not in evaluated:
            row = {"step": step, "tokens": step * config.batch_size * (train.shape[1] - 1),
                   **({"train_loss": float(np.mean(losses)), "train_seconds": seconds} if losses else {}),
                   **evaluate(config, lm, state["params"], teacher, eval_step, val_batches, mesh)}
            append_metrics(workdir, row)
            save_snapshot(lm, state["params"], workdir, step)
            save_checkpoint(manager, state, {"step": step, **plan.position(step), **seeds})
            losses, seconds = [], 0.0
        if step == config.num_steps:
            break
        began = time.perf_counter()
        state, metrics = train_step(state, parallel.global_batch(local_batch(step), mesh))
        metrics = parallel.fetch(metrics)
        seconds += time.perf_counter() - began
        if not (np.isfinite(metrics["loss"]) and metrics["params_finite"]):
            manager.wait_until_finished()
            raise TrainingDiverged(f"Training diverged at step {step + 1} (loss {float(metrics['loss'])}); the last "
                                   f"checkpoint in {manager.directory} is kept. Lower config.optimizer.learning_rate "
                                   f"(now {config.optimizer.learning_rate}).")
        losses.append(float(metrics["loss"]))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % config.checkpoint.every == 0 and step + 1 not in eval_steps:
            save_checkpoint(manager, state, {"step": step + 1, **plan.position(step + 1), **seeds})
    bar.close()
    manager.wait_until_finished()
    manager.close()
    rows = [row for row in read_metrics(workdir) if "epsilon" in row] if parallel.is_main_process() else [{}]
    final = rows[-1]
    results = {"objective": config.objective, "steps": config.num_steps, "val_loss": final.get("val_loss"),
               "epsilon": final.get("epsilon", {}).get("mean"), "quad_excess": final.get("quad_excess", {}).get("mean"),
               "bound_holds_at_every_step": all(row["bound"]["holds"] for row in rows),
               "snapshots": {str(row["step"]): str(snapshot_dir(workdir, row["step"])) for row in rows}}
    if parallel.is_main_process():
        storage.write_json(workdir / RESULTS_FILE, results)
    return {key: results[key] for key in ("val_loss", "epsilon", "quad_excess", "bound_holds_at_every_step")}
