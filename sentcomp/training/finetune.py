"""Full fine-tuning (the FT column of the paper's Table 1): the LM and a linear classification head, trained jointly.

For a document ``s`` (prompt appended as in :mod:`sentcomp.data.text`) with label ``y`` among ``C`` classes, the head
reads the LM's features at the last non-pad token, ``f(s)`` (for a BERT-family encoder that is ``[SEP]``'s state):

    logits(s) = W · dropout_{0.1}(f(s)) + b,      ℓ_cls = E_(s,y)[ −log softmax(logits(s))_y ]

as in the authors' code (GPT-2 + linear head on the last token, dropout 0.1). Optionally a GPT-1-style auxiliary
language-modelling loss is added, ``ℓ = ℓ_cls + λ · ℓ_xent(f, Φ)`` over the document's next-token predictions
(``aux_lm_weight = λ``; causal LMs only), via :func:`sentcomp.kernels.xent_loss`.

Training: AdamW with linear warmup then decay (:mod:`sentcomp.training.steps`), global-norm clipping, fixed-shape
batches padded to length buckets, on the mesh ``config.mesh`` names (:mod:`sentcomp.parallel`): each batch split
over every device; parameters and optimiser state replicated (the default, ``{"data": -1, "fsdp": 1}``) or, with
``fsdp`` > 1, their large leaves split over that many devices (FSDP). ``grad_accum`` > 1 sums the gradients of
that many micro-batches per step (the same update as one batch: each micro-batch contributes its share of the
batch's mean loss); ``compute_dtype="bfloat16"`` runs the LM in bfloat16 with float32 master weights, optimiser
state and head (docs/precision.md). A validation split is carved from the training split (stratified, seeded);
every ``eval_every`` steps the validation accuracy is measured, the best parameters are kept, and training stops
after ``patience`` evaluations without improvement (or at ``max_steps``). Test accuracy is that of the best
parameters (kept in the training state, so fine-tuning holds two copies of the weights).

Throughput: each metrics row has ``tokens_per_s`` (the real, unpadded tokens of the batches over the time of
their train steps, waited for) and ``mfu`` (:mod:`sentcomp.training.throughput`: model FLOPs of those tokens, attention
over the padded length, the output projection Φ only with the auxiliary LM loss, over the devices' peak).

Divergence: a non-finite loss or parameters stop the run with :class:`~sentcomp.training.loop.TrainingDiverged`
naming the step; the last good checkpoint stays the latest (the training loop's check,
:mod:`sentcomp.training.loop`, which fine-tuning shares with pretraining; before it, fine-tuning had none).

Workdir: ``config.json``, ``metrics.jsonl`` (one row per evaluation: the training loop's ``train_loss``,
``tokens_per_s``, ``mfu``, ``train_seconds``, and ``val_accuracy``, ``best_val``, ``best_step``, ``bad_evals``),
``checkpoints/`` (Orbax, written at every evaluation; resumed by :func:`sentcomp.training.checkpoints.resume`, which
refuses a checkpoint of other options), ``results.json``, ``curves.png`` (training
loss and validation accuracy against the step, :mod:`sentcomp.results.plots`). Re-running in the same workdir
resumes from the newest checkpoint (the batch order and dropout masks are functions of the seed and the step,
so an interrupted run ends exactly where an uninterrupted one does) or returns the finished results; a
different config in the same workdir is an error, never a silent overwrite.

Public API: :class:`FinetuneOptions`, :func:`finetune_accuracy`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sentcomp import kernels, models, parallel
from sentcomp.data.loaders import Split, stratified_split
from sentcomp.data.text import (
    bucket_lengths,
    effective_prompt,
    encode_texts,
    encode_with_specials,
    make_batches,
    pad_id,
)
from sentcomp.errors import SentcompError, check_fields
from sentcomp.features import last_token_features
from sentcomp.models.base import COMPUTE_DTYPES, LanguageModel, cast_floats
from sentcomp.results import layout, plots, storage
from sentcomp.training import checkpoints, loop, steps, throughput, tracking

CURVES_FILE = "curves.png"


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """AdamW with linear warmup then decay (:func:`sentcomp.training.steps.make_optimizer` reads these fields)."""

    learning_rate: float = 3e-5
    warmup_steps: int = 100
    decay: str = "linear"
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Fine-tuning hyperparameters, filled by the caller (Table 1 from ``config.ft``:
    :func:`sentcomp.programs.table1.finetune_config`); checked when made."""

    prompt: str | None = None  # appended to every text (e.g. " This movie is "), trailing space stripped
    max_length: int = 512
    buckets: tuple[int, ...] | None = None  # padded lengths of the batches (None: sentcomp.data.text.length_buckets)
    batch_size: int = 32  # global, rounded up to a multiple of the device count × grad_accum
    grad_accum: int = 1  # micro-batches per optimiser step (the gradient is the whole batch's either way)
    compute_dtype: str = "float32"  # or "bfloat16": the LM computes in bf16, master weights and head in float32
    mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(parallel.DEFAULT_MESH))  # merged into
    # the default's axes (sentcomp.parallel)
    eval_batch_size: int = 64
    max_steps: int = 2000
    eval_every: int = 100  # steps between validation accuracies (and checkpoints)
    patience: int = 5  # evaluations without improvement before stopping
    val_fraction: float = 0.1  # of the training split, stratified
    dropout: float = 0.1  # on f(s), before the head
    aux_lm_weight: float = 0.0  # λ of the auxiliary LM loss (0: off)
    head_init_std: float = 0.02
    seed: int = 0
    checkpoint_keep: int = 2
    progress: bool = True
    optimizer: OptimizerOptions = dataclasses.field(default_factory=OptimizerOptions)

    def __post_init__(self):
        object.__setattr__(self, "mesh", {**parallel.DEFAULT_MESH, **dict(self.mesh)})
        if self.buckets is not None:
            object.__setattr__(self, "buckets", tuple(self.buckets))
        if not (0 < self.val_fraction < 1 and 0 <= self.dropout < 1 and self.eval_every >= 1 and self.max_steps >= 1):
            raise SentcompError("Fine-tuning config: need 0 < val_fraction < 1, 0 ≤ dropout < 1, eval_every ≥ 1 and "
                                f"max_steps ≥ 1; got {self.val_fraction}, {self.dropout}, {self.eval_every}, "
                                f"{self.max_steps}.")
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise SentcompError(f"Fine-tuning config: grad_accum must be an integer ≥ 1, got {self.grad_accum!r}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise SentcompError(f"Fine-tuning config: compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got "
                                f"{self.compute_dtype!r}.")
        parallel.mesh_shape(self.mesh, jax.device_count())

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FinetuneOptions:
        """The options from a (nested) mapping such as a config section, the fields not given at their defaults;
        an unknown key is an error naming the known ones."""
        values = dict(values)
        check_fields(values, cls, "fine-tuning config")
        if "optimizer" in values:
            check_fields(values["optimizer"], OptimizerOptions, "fine-tuning optimizer")
            values["optimizer"] = OptimizerOptions(**values["optimizer"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The options as JSON values (``buckets`` a list)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----------------------------------------------------------------------------------------------- the model


def init_head(rng: jax.Array, d: int, num_classes: int, std: float) -> dict[str, jax.Array]:
    return {"kernel": std * jax.random.normal(rng, (d, num_classes)), "bias": jnp.zeros((num_classes,))}


def lm_targets(mask: jax.Array, weights: jax.Array) -> jax.Array:
    """``[B, L−1]``: the next-token predictions the auxiliary LM loss counts (both tokens real, row weighted)."""
    return mask[:, 1:] * mask[:, :-1] * weights[:, None]


def classification_loss(hidden_fn, phi_fn, dropout: float, aux_lm_weight: float, compute_dtype, params, token_ids,
                        mask, labels, weights, keep, totals):
    """One micro-batch's share of the batch loss ``ℓ_cls + λ·ℓ_xent``:

        Σ_rows w·ℓ_cls / W  +  λ · n·ℓ̄_xent / N

    with ``W = totals["rows"]`` (the whole batch's summed row weights; padding rows weigh 0) and ``N =
    totals["targets"]`` (its counted next-token positions), ``ℓ̄_xent`` this micro-batch's mean over its ``n``
    positions; summed over the micro-batches, the shares are the whole batch's means exactly. ``keep [B, d]``:
    the dropout mask on ``f(s)``. The LM runs in ``compute_dtype`` (its float32 weights cast), the head in
    float32."""
    lm_params = cast_floats(params["lm"], compute_dtype)
    hidden = hidden_fn(lm_params, token_ids, mask)
    f = last_token_features(hidden, mask).astype(jnp.float32)
    if dropout > 0:
        f = jnp.where(keep, f / (1.0 - dropout), 0.0)
    logits = f @ params["head"]["kernel"] + params["head"]["bias"]
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = jnp.sum(weights * per_row) / totals["rows"]
    if aux_lm_weight > 0:
        targets_mask = lm_targets(mask, weights)
        mean = kernels.xent_loss(hidden[:, :-1], phi_fn(lm_params), token_ids[:, 1:], targets_mask)
        loss = loss + aux_lm_weight * mean * jnp.sum(targets_mask) / totals["targets"]
    return loss


def make_train_step(lm: LanguageModel, optimizer, config: FinetuneOptions, mesh):
    """Jitted ``(state, ids, mask, labels, weights) -> (state, {"loss", "params_finite"})`` on a global batch of
    ``B`` rows: the summed gradients of its ``config.grad_accum`` micro-batches (rows ``r`` with ``r mod accum =
    k``, each split over the devices; :func:`classification_loss`), one optimiser update. The dropout mask is drawn
    for the whole batch from ``fold_in(seed, step)``, so neither it nor the update depends on ``grad_accum`` (up to
    float summation order). The state keeps its layout (:func:`sentcomp.parallel.state_shardings`)."""
    loss_fn = functools.partial(classification_loss, lm.hidden_fn, lm.phi_fn, config.dropout, config.aux_lm_weight,
                                COMPUTE_DTYPES[config.compute_dtype])
    grad_fn = jax.value_and_grad(loss_fn)
    base_key = jax.random.key(config.seed)
    accum = config.grad_accum

    def step(state, token_ids, mask, labels, weights):
        rows, d = token_ids.shape[0], state["params"]["head"]["kernel"].shape[0]
        keep = jax.random.bernoulli(jax.random.fold_in(base_key, state["step"]), 1.0 - config.dropout, (rows, d))
        totals = {"rows": jnp.maximum(jnp.sum(weights), 1.0),
                  "targets": jnp.maximum(jnp.sum(lm_targets(mask, weights)), 1.0)}
        micro_batches = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(rows // accum, accum, *x.shape[1:]), 0, 1),
                                     (token_ids, mask, labels, weights, keep))

        def accumulate(carry, micro):
            loss, grads = grad_fn(state["params"], *micro, totals)
            return jax.tree.map(jnp.add, carry, (loss, parallel.constrain_state(grads, mesh))), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return parallel.constrain_state(new_state, mesh), {"loss": loss, "params_finite": steps.all_finite(params)}

    batch = parallel.batch_sharding(mesh)  # the state: None = its own layout
    return jax.jit(step, in_shardings=(None, batch, batch, batch, batch),
                   out_shardings=(None, parallel.replicated(mesh)))


def make_predict(lm: LanguageModel, mesh, compute_dtype=jnp.float32):
    """Jitted ``(params, ids, mask) -> predicted class [B]`` (no dropout; the LM in ``compute_dtype``)."""

    def predict(params, token_ids, mask):
        hidden = lm.hidden_fn(cast_floats(params["lm"], compute_dtype), token_ids, mask)
        f = last_token_features(hidden, mask).astype(jnp.float32)
        return jnp.argmax(f @ params["head"]["kernel"] + params["head"]["bias"], axis=-1)

    batch = parallel.batch_sharding(mesh)  # params: None = their own layout
    return jax.jit(predict, in_shardings=(None, batch, batch), out_shardings=batch)


# ------------------------------------------------------------------------------------------------ the data


def training_rows(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Example indices of step ``step``'s batch: stream positions ``step·B .. step·B+B−1`` through one seeded
    permutation of the ``n`` examples per epoch (a pure function of the step, so resuming replays it exactly)."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = positions // n, positions % n
    rows = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        rows[epochs == epoch] = np.random.default_rng([seed, int(epoch)]).permutation(n)[offsets[epochs == epoch]]
    return rows


def accuracy(predict, params, token_ids, labels, batch_size, buckets, padding, mesh) -> float:
    """Fraction of correctly classified examples, in fixed-shape batches split over the mesh."""
    correct = 0
    for batch in make_batches(token_ids, batch_size, buckets, padding):
        predicted = parallel.apply_to_batch(predict, (batch.token_ids, batch.mask), mesh, params)[: len(batch.indices)]
        correct += int(np.sum(predicted == labels[batch.indices]))
    return correct / max(len(token_ids), 1)


def encode(lm: LanguageModel, texts, max_length: int, prompt: str | None) -> list[np.ndarray]:
    """Token ids of ``text + prompt``; a BERT-family encoder gets ``[CLS] text prompt [SEP]``."""
    if models.facts(lm.family).special_tokens:
        return encode_with_specials(lm.tokenizer, texts, max_length, effective_prompt(prompt))
    return encode_texts(lm.tokenizer, texts, max_length, prompt).token_ids


# --------------------------------------------------------------------------------------------- the program


def _check_workdir_config(workdir: Path, options: FinetuneOptions, identity: dict[str, Any]) -> None:
    settings = {key: value for key, value in json.loads(json.dumps(options.to_json(), sort_keys=True)).items()
                if key != "mesh"}  # any mesh may resume it; keys sorted (as the ConfigDict this record once was)
    record = json.loads(json.dumps({"config": settings, **identity}))
    path = workdir / "config.json"
    recorded = parallel.main_decides(lambda: json.loads(path.read_text()) if path.is_file() else None)
    if recorded is None and parallel.is_main_process():
        workdir.mkdir(parents=True, exist_ok=True)
        storage.write_json(path, record)
    elif recorded is not None and recorded != record:
        raise SentcompError(f"{workdir} holds a fine-tuning run with a different config, model or data "
                            f"({path}); use a new workdir.")


def finetune_accuracy(lm: LanguageModel, train_split: Split, test_split: Split, options: FinetuneOptions | None = None,
                      workdir: str | Path = ".", on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fine-tunes ``lm`` + a linear head on ``train_split`` (a validation part carved out for early stopping)
    and returns ``dict(test_accuracy, val_accuracy, best_step, steps, stopped_early, n_train, n_val, n_test)``.

    ``options``: the hyperparameters (None: :class:`FinetuneOptions`' defaults). ``on_step(step)`` is called
    after every optimiser step (for progress hooks; an exception raised there interrupts the run, which the next
    call resumes). The steps run in :func:`sentcomp.training.loop.train_loop`: a non-finite loss or parameters stop
    the run with :class:`~sentcomp.training.loop.TrainingDiverged`, the last good checkpoint kept.
    """
    options = FinetuneOptions() if options is None else options
    workdir = Path(workdir).resolve()
    if options.aux_lm_weight > 0 and not models.facts(lm.family).causal:
        raise SentcompError(f"aux_lm_weight > 0 needs a causal LM ({models.causal_families()}); {lm.name} is "
                            f"{lm.family!r}.")
    if lm.tokenizer is None:
        raise SentcompError(f"{lm.name} has no tokenizer; fine-tuning needs one to encode the texts.")
    labels_all = np.concatenate([train_split.labels, test_split.labels])
    num_classes = int(labels_all.max()) + 1 if len(labels_all) else 0
    if num_classes < 2:
        raise SentcompError("Fine-tuning needs at least two classes in the training and test labels.")
    train, val = stratified_split(train_split, options.val_fraction, options.seed)
    if not len(train) or not len(val):
        raise SentcompError(f"val_fraction={options.val_fraction} of {len(train_split)} training examples leaves an "
                            "empty training or validation split.")
    _check_workdir_config(workdir, options, {"model": lm.name, "n_train": len(train_split),
                                             "n_test": len(test_split), "num_classes": num_classes})
    finished = parallel.main_decides(lambda: json.loads((workdir / layout.RESULTS_FILE).read_text())
                                     if (workdir / layout.RESULTS_FILE).is_file() else None)
    if finished is not None:
        return finished

    mesh = parallel.make_mesh(options.mesh)
    batch_size = parallel.pad_to_multiple(options.batch_size, mesh.size * options.grad_accum)
    eval_batch = parallel.pad_to_multiple(options.eval_batch_size, mesh.size)
    max_length = min(options.max_length, lm.max_length)
    buckets = bucket_lengths(max_length, options.buckets)
    padding = pad_id(lm.tokenizer)
    train_ids, val_ids, test_ids = (encode(lm, split.texts, max_length, options.prompt)
                                    for split in (train, val, test_split))

    dummy = jnp.zeros((1, 2), jnp.int32)
    d = jax.eval_shape(lm.hidden_fn, lm.params, dummy, jnp.ones_like(dummy)).shape[-1]
    params = {"lm": lm.params,
              "head": init_head(jax.random.key(options.seed + 1), d, num_classes, options.head_init_std)}
    optimizer = steps.make_optimizer(options.optimizer, options.max_steps, params)
    state = steps.initial_state(params, optimizer, mesh)
    state["best_params"] = state["params"]
    seeds = {"seed": options.seed, "settings": checkpoints.resume_settings(options)}
    manager, state, meta = checkpoints.resume(workdir, state, options.eval_every, options.checkpoint_keep,
                                              expected=seeds)
    progress = {"best_val": -1.0, "best_step": 0, "bad_evals": 0}
    if meta is not None:
        progress = {key: meta[key] for key in progress}
    start = int(parallel.fetch(state["step"]))

    train_step = make_train_step(lm, optimizer, options, mesh)
    predict = make_predict(lm, mesh, COMPUTE_DTYPES[options.compute_dtype])
    host_rows = parallel.host_row_indices(batch_size, mesh)
    weights = np.ones(batch_size, np.float32)
    n_matmul, attention = throughput.matmul_params(lm, options.aux_lm_weight > 0), throughput.attention_shape(lm)

    def batch_of(step: int) -> loop.Batch:
        rows = training_rows(step, batch_size, len(train), options.seed)
        (batch,) = make_batches([train_ids[i] for i in rows], batch_size, buckets, padding)
        arrays = (batch.token_ids, batch.mask, train.labels[rows][batch.indices].astype(np.int32), weights)
        tokens = int(batch.mask.sum())
        flops = tokens * throughput.transformer_flops_per_token(n_matmul, *attention, batch.token_ids.shape[1])
        return loop.Batch(parallel.global_batch(tuple(array[host_rows] for array in arrays), mesh), tokens, flops)

    def validate(done: loop.StepDone) -> dict[str, Any]:
        """Validation accuracy; the best parameters so far kept in the state (updated in place)."""
        nonlocal progress
        val_acc = accuracy(predict, done.state["params"], val_ids, val.labels, eval_batch, buckets, padding, mesh)
        if val_acc > progress["best_val"]:
            progress = {"best_val": val_acc, "best_step": done.step, "bad_evals": 0}
            done.state["best_params"] = done.state["params"]
        else:
            progress = {**progress, "bad_evals": progress["bad_evals"] + 1}
        return {"val_accuracy": val_acc, **progress}

    def stopped_early() -> bool:
        return progress["bad_evals"] >= options.patience

    hooks = [loop.every(options.eval_every, validate)]
    if on_step is not None:
        hooks.append(loop.every(1, lambda done: on_step(done.step)))
    state, step = loop.train_loop(
        state, train_step, batch_of, start, options.max_steps, hooks, workdir=workdir, name=f"finetune {lm.name}",
        progress=options.progress, stop=stopped_early,
        checkpointing=loop.Checkpointing(manager, lambda step: {"step": step, **seeds, **progress}, with_rows=True),
        hardware=loop.Throughput(throughput.peak_flops(jax.local_devices()[0]), mesh.size),
        last_saved=start if meta is not None else None,
        hint=f"Lower the fine-tuning optimizer's learning_rate (now {options.optimizer.learning_rate}) or clip_norm.")

    test_acc = accuracy(predict, state["best_params"], test_ids, test_split.labels, eval_batch, buckets, padding, mesh)
    results = {"test_accuracy": test_acc, "val_accuracy": progress["best_val"], "best_step": progress["best_step"],
               "steps": step, "stopped_early": bool(stopped_early()), "n_train": len(train), "n_val": len(val),
               "n_test": len(test_split)}
    if parallel.is_main_process():
        storage.write_json(workdir / layout.RESULTS_FILE, results)
        plots.training_curves({lm.name: tracking.read_metrics(workdir)}, workdir / CURVES_FILE,
                              f"fine-tuning {lm.name}", prefixes=plots.LEARNING_CURVES)
    return results
