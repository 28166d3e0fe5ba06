"""Pretraining a GPT-2 with cross-entropy or the paper's Quad loss: data-parallel, checkpointed, resumable.

    python -m sentcomp.main --config=experiments/pretrain.py:loss=quad --workdir=runs/pretrain_quad

``run(config, workdir)`` trains ``config.model`` on ``config.data.corpus`` (:mod:`sentcomp.data.corpora`) with

* **loss** ``xent``: ``ℓ_xent = E[log Z(f(s)) − f(s)ᵀφ_w]`` (:func:`sentcomp.kernels.xent_loss`, streamed over V),
  or ``quad``: ``ℓ_quad = E[−f(s)ᵀφ_w + ½ f(s)ᵀ(ΦᵀΦ)f(s)]`` (:func:`sentcomp.kernels.quad_loss`, Gram trick and a
  fused backward: no V-wide logits), both averaged over the target positions (../shared/PAPER.md);
* **model**: ``config.model`` (tied or untied Φ; ``quad_head`` = the paper's extra d×d linear layer + untied Φ),
  from scratch or from a pretrained model (``config.init.source``, anything :func:`sentcomp.models.load` takes);
  ``config.init.freeze_phi`` keeps Φ at its initial value (for a tied model that also freezes the input
  embedding, which is the same matrix);
* **optimiser**: optax AdamW (weight decay on matrices only), linear warmup then cosine or linear decay, global-norm
  gradient clipping, ``grad_accum`` micro-batches per step; ``compute_dtype="bfloat16"`` runs the model and loss in
  bf16 with float32 master weights and optimiser state;
* **data parallelism**: one jitted step on the mesh of every device (:mod:`sentcomp.parallel`): each micro-batch
  sharded over the devices, parameters and optimiser state replicated. The global batch (``batch_size`` blocks
  per step) does not depend on the device count, so neither does the loss (up to float summation order). With
  several processes each loads only its rows (``parallel.host_row_indices``).

**Data order**: step ``t`` reads the blocks at stream positions ``t·B .. t·B + B − 1``
(:func:`sentcomp.data.corpora.block_indices`): a pure function of ``(data seed, step)``.

**Workdir**: ``corpus/`` (packed token blocks, keyed by corpus + tokenizer), ``checkpoints/`` (Orbax
``CheckpointManager``: every ``checkpoint.every`` steps and at the end, the last ``checkpoint.keep``, written
asynchronously; each holds params, optimiser state, step, and as JSON the data position and seeds),
``metrics.jsonl`` (one line per ``eval_every`` steps: train loss, validation cross-entropy and Quad loss,
tokens/s, learning rate, gradient norm, and the downstream probe's accuracies when it ran), ``results.json``
(headline), ``model/`` (final weights in Hugging Face layout, loadable by ``sentcomp.models.load``).

**Resume**: running again with the same workdir restores the latest checkpoint (metrics logged after it are
dropped) and continues; a run killed at any moment and resumed ends with the parameters an uninterrupted run
would have. A latest checkpoint that cannot be read is moved to ``checkpoints_corrupt/`` with a warning and the
previous one is used. The model has no dropout, so the data order is the run's only randomness: the seeds and
the data position in the checkpoint are what make resumption exact (a resume with other seeds is refused).

**Divergence**: a non-finite loss or parameters stop the run with :class:`TrainingDiverged` naming the step;
no checkpoint is written from then on, so the last good one stays the latest.

**Downstream probe** (``probe.every`` > 0): features ``f(s)`` and ``Φp_f(s)`` of a task's texts + its prompt from
the current weights (:func:`sentcomp.features.extract_features`), a linear probe on each
(:func:`sentcomp.probe.evaluate`, ``probe.protocol``); test accuracies go into the same metrics line, so
accuracy-vs-loss curves come out of one run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from sentcomp import kernels, parallel
from sentcomp.data import corpora
from sentcomp.errors import SentcompError
from sentcomp.models import gpt2, tokenizers
from sentcomp.models.base import LanguageModel

LOSSES: dict[str, Callable] = {"xent": kernels.xent_loss, "quad": kernels.quad_loss}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DECAYS = ("cosine", "linear")
TOKENIZERS = {"gpt2": "gpt2_tokenizer", "bytes": "byte_tokenizer"}  # config.tokenizer -> sentcomp.models.tokenizers
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


class TrainingDiverged(SentcompError):
    """The loss (or the parameters) became NaN/inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------ the model


def build_model(config) -> LanguageModel:
    """The LM to train: ``config.init.source`` loaded (pretrained, with its own tokenizer), or a random GPT-2 of
    shape ``config.model`` with ``config.tokenizer`` (``vocab_size`` 0 = the tokenizer's size)."""
    model = config.model
    if config.init.source:
        from sentcomp import models

        lm = models.load(config.init.source, quad_head=True if model.quad_head else None)
        if lm.family != "gpt2":
            raise SentcompError(f"Pretraining trains GPT-2 models; {config.init.source!r} is a {lm.family!r} model.")
        return untie(lm) if not model.tie_word_embeddings and lm.config.tie_word_embeddings else lm
    if config.tokenizer not in TOKENIZERS:
        raise SentcompError(f"config.tokenizer must be one of {sorted(TOKENIZERS)}, got {config.tokenizer!r}.")
    tokenizer = getattr(tokenizers, TOKENIZERS[config.tokenizer])()
    shape = {key: model[key] for key in ("n_positions", "n_embd", "n_layer", "n_head")}
    gpt2_config = gpt2.gpt2_config(**shape, vocab_size=model.vocab_size or len(tokenizer),
                                   tie_word_embeddings=model.tie_word_embeddings)
    return gpt2.init(gpt2_config, jax.random.key(config.seed), quad_head=model.quad_head, tokenizer=tokenizer)


def untie(lm: LanguageModel) -> LanguageModel:
    """A copy with Φ untied from ``wte`` (``params["phi"]`` starts as a copy of it)."""
    config = dataclasses.replace(lm.config, tie_word_embeddings=False)
    params = {**lm.params, "phi": jnp.array(lm.params["wte"]["embedding"])}
    return lm.replace(config=config, params=params, hidden_fn=functools.partial(gpt2.hidden_fn, config))


def phi_path(params) -> str:
    """The top-level parameter holding Φ: ``phi`` if untied, else the shared ``wte``."""
    return "phi" if "phi" in params else "wte"


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


def make_optimizer(opt, num_steps: int, params, freeze_phi: bool) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decay on ≥2-D weights); Φ's updates zeroed when ``freeze_phi``."""
    adamw = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(learning_rate_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)),
    )
    if not freeze_phi:
        return adamw
    frozen = phi_path(params)
    labels = {key: jax.tree.map(lambda _, k=key: "frozen" if k == frozen else "train", value)
              for key, value in params.items()}
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------------------------- the step


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def batch_loss(loss_name: str, hidden_fn, params, tokens: jax.Array, mask: jax.Array, compute_dtype) -> jax.Array:
    """The training objective on blocks ``tokens [B, T+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), averaged
    over the target positions ``mask [B, T]`` marks; model and loss run in ``compute_dtype``."""
    params = cast_floats(params, compute_dtype)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = hidden_fn(params, inputs, jnp.ones_like(inputs))
    return LOSSES[loss_name](hidden, gpt2.phi_fn(params), targets, mask)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(loss_name: str, hidden_fn, optimizer, compute_dtype, mesh):
    """The jitted ``(state, tokens [micro, accum, T+1]) -> (state, metrics)``: the mean gradient of the
    ``accum`` micro-batches (each sharded over the devices), one optimiser update."""
    grad_fn = jax.value_and_grad(functools.partial(batch_loss, loss_name, hidden_fn))

    def step(state, tokens):
        mask = jnp.ones(tokens.shape[:1] + (tokens.shape[2] - 1,), bool)

        def accumulate(carry, micro_tokens):
            loss, grads = grad_fn(state["params"], micro_tokens, mask, compute_dtype)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, jnp.swapaxes(tokens, 0, 1))
        accum = tokens.shape[1]
        loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": all_finite(params)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    whole = parallel.replicated(mesh)
    tokens_sharding = parallel.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(whole, tokens_sharding), out_shardings=(whole, whole), donate_argnums=0)


def initial_state(params, optimizer, mesh) -> dict[str, Any]:
    """``{"params", "opt_state", "step": 0}``, replicated over the mesh."""
    params = parallel.replicate(params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=parallel.replicated(mesh))(params)
    return {"params": params, "opt_state": opt_state, "step": parallel.replicate(jnp.zeros((), jnp.int32), mesh)}


def make_eval_step(hidden_fn, compute_dtype, mesh):
    """The jitted ``(params, tokens [B, T+1], mask [B, T]) -> {xent, quad: summed loss, count}``."""

    def evaluate(params, tokens, mask):
        params = cast_floats(params, compute_dtype)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        hidden = hidden_fn(params, inputs, jnp.ones_like(inputs))
        phi, weights = gpt2.phi_fn(params), mask.astype(jnp.float32)
        return {
            "xent": jnp.sum(weights * kernels.xent_per_position(hidden, phi, targets)),
            "quad": jnp.sum(weights * kernels.quad_per_position(hidden, phi, targets)),
            "count": jnp.sum(weights),
        }

    batch = parallel.batch_sharding(mesh)
    return jax.jit(evaluate, in_shardings=(parallel.replicated(mesh), batch, batch), out_shardings=parallel.replicated(mesh))


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
        return {"blocks_consumed": consumed, "epoch": consumed // len(self.blocks), "offset": consumed % len(self.blocks)}

    def local_tokens(self, step: int) -> np.ndarray:
        """This process's rows of step ``step``'s batch, ``[local micro rows, accum, T+1]``: stream position
        ``step·B + k·micro + r`` for micro-batch ``k`` and row ``r``."""
        positions = (step * self.global_batch + np.arange(self.grad_accum)[None, :] * self.micro_batch
                     + self.host_rows[:, None])
        return self.blocks[corpora.block_indices(positions.reshape(-1), len(self.blocks), self.seed)].reshape(
            *positions.shape, -1)


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


def load_corpus(config, tokenizer, workdir: Path) -> dict[str, np.ndarray]:
    """Packed blocks of the corpus, built once by process 0 into ``workdir/corpus`` and read by every process."""
    spec = corpora.CorpusSpec.from_config(config.data.corpus)
    cache = workdir / "corpus"
    if parallel.is_main_process():
        corpora.load_blocks(spec, tokenizer, config.data.seq_len, cache, progress=config.progress)
    parallel.sync("sentcomp_pretrain_corpus_ready")
    return corpora.load_blocks(spec, tokenizer, config.data.seq_len, cache, progress=False)


# ------------------------------------------------------------------------------------------- checkpointing


def checkpoint_manager(workdir: Path, every: int, keep: int, asynchronous: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                           enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state, meta: dict[str, Any]) -> None:
    step = int(meta["step"])
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)


def restore_latest(manager: ocp.CheckpointManager, state, workdir: Path, factory: Callable[[], ocp.CheckpointManager]):
    """``(manager, state, meta)`` from the newest readable checkpoint, or ``(manager, None, None)`` if none.

    An unreadable checkpoint (corrupt or partial) is moved to ``workdir/checkpoints_corrupt/`` with a warning
    and the previous one is tried.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            return manager, restored["state"], dict(restored["meta"])
        except Exception as error:  # any failure to read means the same: this checkpoint is unusable
            warnings.warn(f"Checkpoint at step {step} in {manager.directory} cannot be restored "
                          f"({type(error).__name__}: {str(error)[:200]}); moving it to checkpoints_corrupt/ and "
                          "falling back to the previous checkpoint.", stacklevel=2)
            manager.close()
            if parallel.is_main_process():
                aside = workdir / "checkpoints_corrupt" / f"{step}-{int(time.time())}"
                aside.parent.mkdir(exist_ok=True)
                shutil.move(str(Path(manager.directory) / str(step)), aside)
            parallel.sync(f"sentcomp_pretrain_corrupt_{step}")
            manager = factory()
    return manager, None, None


# ------------------------------------------------------------------------------------------------ metrics


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def truncate_metrics(workdir: Path, step: int) -> None:
    """Drops the metrics lines logged after ``step`` (by a run that died before its next checkpoint)."""
    kept = [row for row in read_metrics(workdir) if row["step"] <= step]
    (workdir / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in kept))


def append_metrics(workdir: Path, row: dict[str, Any]) -> None:
    if parallel.is_main_process():
        with open(workdir / METRICS_FILE, "a") as file:
            file.write(json.dumps(row) + "\n")


def validation_losses(eval_step, params, batches, mesh) -> dict[str, float]:
    """Validation cross-entropy and Quad loss: means over every counted position of ``batches``."""
    totals = {"xent": 0.0, "quad": 0.0, "count": 0.0}
    for tokens, mask in batches:
        out = parallel.fetch(eval_step(params, *parallel.global_batch((tokens, mask), mesh)))
        totals = {key: totals[key] + float(out[key]) for key in totals}
    count = max(totals["count"], 1.0)
    return {"val_xent": totals["xent"] / count, "val_quad": totals["quad"] / count}


# -------------------------------------------------------------------------------------------------- probe


def probe_task_data(probe) -> dict[str, Any]:
    """Seeded subsets (``probe.num_train``/``num_test`` examples) of a task's train and test splits."""
    from sentcomp.data import get_task, load_task

    task = get_task(probe.task)
    splits = load_task(task)
    rng = np.random.default_rng(probe.seed)
    chosen = {}
    for split, size in (("train", probe.num_train), ("test", probe.num_test)):
        data = splits[split]
        chosen[split] = data.take(np.sort(rng.permutation(len(data))[:size])) if 0 < size < len(data) else data
    return {"task": task, **chosen}


def probe_accuracies(lm: LanguageModel, params, probe, data, mesh) -> dict[str, float]:
    """``probe_<kind>`` test accuracy for each feature kind of ``probe.features``, from the current weights.

    Features are computed data-parallel over ``mesh`` (each process feeds its rows); every process fits the probe.
    """
    from sentcomp import probe as probe_lib
    from sentcomp.features import extract_features

    current = lm.replace(params=params)
    kinds = tuple(probe.features)
    features = {split: extract_features(current, data[split].texts, kinds, prompt=data["task"].prompt,
                                        max_length=probe.max_length, batch_size=probe.batch_size, mesh=mesh,
                                        progress=False)
                for split in ("train", "test")}
    return {f"probe_{kind}": probe_lib.evaluate(features["train"][kind], data["train"].labels, features["test"][kind],
                                                data["test"].labels, protocol=probe.protocol,
                                                standardize=probe.standardize, seed=probe.seed)["test_accuracy"]
            for kind in kinds}


# ---------------------------------------------------------------------------------------------------- run


def check_config(config) -> None:
    if config.loss not in LOSSES:
        raise SentcompError(f"config.loss must be one of {sorted(LOSSES)}, got {config.loss!r}.")
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise SentcompError(f"config.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {config.compute_dtype!r}.")
    for key in ("num_steps", "batch_size", "grad_accum", "eval_every"):
        if config[key] < 1:
            raise SentcompError(f"config.{key} must be ≥ 1, got {config[key]}.")
    if config.batch_size % config.grad_accum:
        raise SentcompError(f"config.batch_size={config.batch_size} must be a multiple of grad_accum={config.grad_accum}.")
    if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
        raise SentcompError("config.checkpoint.every and config.checkpoint.keep must be ≥ 1.")


def run(config, workdir) -> dict[str, Any]:
    """Trains (or resumes training) in ``workdir``; returns the headline metrics (also in ``results.json``)."""
    check_config(config)
    workdir = Path(workdir).resolve()
    mesh = parallel.data_mesh()
    micro_batch = config.batch_size // config.grad_accum
    if micro_batch % mesh.size:
        raise SentcompError(f"Each micro-batch ({config.batch_size} // grad_accum {config.grad_accum} = {micro_batch} "
                            f"blocks) must split evenly over the {mesh.size} devices.")
    lm = build_model(config)
    if config.data.seq_len > lm.config.n_positions:
        raise SentcompError(f"data.seq_len={config.data.seq_len} exceeds the model's context of {lm.config.n_positions}.")
    blocks = load_corpus(config, lm.tokenizer, workdir)
    if int(blocks["train"].max()) >= lm.config.vocab_size:
        raise SentcompError(f"The corpus has token ids up to {int(blocks['train'].max())} but the model only "
                            f"{lm.config.vocab_size} embeddings; use a tokenizer matching the model.")
    host_rows = parallel.host_row_indices(micro_batch, mesh)
    plan = DataPlan(blocks["train"], micro_batch, config.grad_accum, config.data.seed, host_rows)
    eval_batch = parallel.pad_to_multiple(config.eval_batch_size, mesh.size)
    val_batches = validation_batches(blocks["validation"], config.eval_blocks, eval_batch,
                                     parallel.host_row_indices(eval_batch, mesh))

    optimizer = make_optimizer(config.optimizer, config.num_steps, lm.params, config.init.freeze_phi)
    state = initial_state(lm.params, optimizer, mesh)
    seeds = {"seed": config.seed, "data_seed": config.data.seed}
    factory = functools.partial(checkpoint_manager, workdir, config.checkpoint.every, config.checkpoint.keep,
                                config.checkpoint.asynchronous)
    manager, restored, meta = restore_latest(factory(), state, workdir, factory)
    if restored is not None:
        if {key: meta[key] for key in seeds} != seeds:
            raise SentcompError(f"The checkpoint in {workdir} was trained with seeds {meta} but the config has {seeds}.")
        state = restored
        if parallel.is_main_process():
            truncate_metrics(workdir, int(meta["step"]))
    start = int(parallel.fetch(state["step"]))

    compute_dtype = COMPUTE_DTYPES[config.compute_dtype]
    train_step = make_train_step(config.loss, lm.hidden_fn, optimizer, compute_dtype, mesh)
    eval_step = make_eval_step(lm.hidden_fn, compute_dtype, mesh)
    probe_data = probe_task_data(config.probe) if config.probe.every > 0 else None
    schedule = learning_rate_schedule(config.optimizer, config.num_steps)
    tokens_per_step = config.batch_size * config.data.seq_len
    last_saved = start if restored is not None else None
    losses, train_seconds, row = [], 0.0, None

    bar = tqdm(total=config.num_steps, initial=start, desc=f"pretrain {config.loss}", unit="step",
               disable=not (config.progress and parallel.is_main_process()))
    for step in range(start, config.num_steps):
        tokens = parallel.global_batch(plan.local_tokens(step), mesh)
        began = time.perf_counter()
        state, metrics = train_step(state, tokens)
        metrics = parallel.fetch(metrics)
        train_seconds += time.perf_counter() - began
        done = step + 1
        if not (np.isfinite(metrics["loss"]) and metrics["params_finite"]):
            manager.wait_until_finished()
            kept = f"the last good checkpoint (step {last_saved}) is kept in {manager.directory}" if last_saved \
                else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"Training diverged at step {done}: loss {float(metrics['loss'])}"
                f"{'' if metrics['params_finite'] else ', non-finite parameters'}; {kept}. Lower "
                f"optimizer.learning_rate (now {config.optimizer.learning_rate}) or optimizer.clip_norm, or use float32.")
        losses.append(float(metrics["loss"]))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if done % config.eval_every == 0 or done == config.num_steps:
            row = {"step": done, "tokens": done * tokens_per_step, "train_loss": float(np.mean(losses)),
                   **validation_losses(eval_step, state["params"], val_batches, mesh),
                   "tokens_per_s": len(losses) * tokens_per_step / max(train_seconds, 1e-9),
                   "learning_rate": float(schedule(step)), "grad_norm": float(metrics["grad_norm"])}
            row["val_loss"] = row[f"val_{config.loss}"]
            if probe_data is not None and (done % config.probe.every == 0 or done == config.num_steps):
                row.update(probe_accuracies(lm, state["params"], config.probe, probe_data, mesh))
            append_metrics(workdir, row)
            losses, train_seconds = [], 0.0
        if done % config.checkpoint.every == 0 or done == config.num_steps:
            save_checkpoint(manager, state, {"step": done, **plan.position(done), **seeds})
            last_saved = done
    bar.close()
    manager.wait_until_finished()
    manager.close()
    return finish(config, workdir, lm, state, plan)


def finish(config, workdir: Path, lm: LanguageModel, state, plan: DataPlan) -> dict[str, Any]:
    """Writes ``results.json`` and the final weights (``model/``, HF layout); returns the headline."""
    final = read_metrics(workdir)[-1] if parallel.is_main_process() else {}
    step = int(parallel.fetch(state["step"]))
    results = {"loss": config.loss, "steps": step, "tokens": step * config.batch_size * config.data.seq_len,
               **{key: value for key, value in final.items() if key not in ("step", "tokens")},
               "train_blocks": int(len(plan.blocks)), "epochs": step * plan.global_batch / len(plan.blocks)}
    trained = lm.replace(params=parallel.fetch(state["params"]))
    if parallel.is_main_process():
        gpt2.save_hf(trained, workdir / "model")
        trained.tokenizer.save_pretrained(str(workdir / "model"))
        (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results
