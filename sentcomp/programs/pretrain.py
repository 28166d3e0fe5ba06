"""Pretraining a GPT-2 or a Llama-family LM with cross-entropy or the paper's Quad loss: data-parallel,
checkpointed, resumable.

    python -m sentcomp.main --config=experiments/pretrain.py:loss=quad --workdir=runs/pretrain_quad

``run(config, workdir)`` trains ``config.model`` on ``config.data.corpus`` (:mod:`sentcomp.data.corpora`) with

* **loss** ``xent``: ``ℓ_xent = E[log Z(f(s)) − f(s)ᵀφ_w]`` (:func:`sentcomp.kernels.xent_loss`, streamed over V),
  or ``quad``: ``ℓ_quad = E[−f(s)ᵀφ_w + ½ f(s)ᵀ(ΦᵀΦ)f(s)]`` (:func:`sentcomp.kernels.quad_loss`, Gram trick and a
  fused backward: no V-wide logits), both averaged over the target positions (../shared/PAPER.md);
* **model**: ``config.model`` (tied or untied Φ; ``quad_head`` = the paper's extra d×d linear layer + untied Φ),
  from scratch (``config.model.family``: ``gpt2``, or a rotary decoder ``llama``, ``qwen2``, ``mistral``,
  ``gemma``, ``gpt_neox``, shaped by :func:`sentcomp.models.hf_model_config`) or from a pretrained causal LM of any
  of those families (``config.init.source``, anything :func:`sentcomp.models.load` takes, e.g. the offline
  SmolLM2-135M);
  ``config.init.freeze_phi`` keeps Φ at its initial value (for a tied model that also freezes the input
  embedding, which is the same matrix); ``config.init.phi_from`` / ``config.init.embeddings_from`` start only Φ /
  the input embeddings from a pretrained model (any :func:`sentcomp.models.load` source) and the rest from
  scratch (:func:`with_pretrained_parts`, the authors' option);
* **optimiser**: optax AdamW (weight decay on matrices only), linear warmup then cosine or linear decay, global-norm
  gradient clipping, ``grad_accum`` micro-batches per step; ``compute_dtype="bfloat16"`` runs the model and loss in
  bf16 with float32 master weights and optimiser state;
* **data parallelism and FSDP**: one jitted step on the mesh ``config.mesh`` names (:mod:`sentcomp.parallel`;
  ``{"data": -1, "fsdp": 1}`` by default): each micro-batch sharded over all the devices, parameters and optimiser
  state replicated along ``data`` and split along ``fsdp`` (each large leaf along its largest dimension the fsdp
  size divides, :func:`sentcomp.parallel.leaf_sharding`). The global batch (``batch_size`` blocks per step) does
  not depend on the device count or mesh shape, so neither does the loss (up to float summation order), and a
  checkpoint restores onto any mesh shape. With several processes each loads only its rows
  (``parallel.host_row_indices``). The layer stack runs scanned or unrolled, with optional rematerialisation and
  chunked attention (``config.model``'s execution keys, docs/pretraining.md).

**Data order**: step ``t`` reads the blocks at stream positions ``t·B .. t·B + B − 1``
(:func:`sentcomp.data.corpora.block_indices`): a pure function of ``(data seed, step)``.

**Workdir**: ``corpus/`` (packed token blocks, keyed by corpus + tokenizer), ``checkpoints/`` (Orbax
``CheckpointManager``: every ``checkpoint.every`` steps and at the end, the last ``checkpoint.keep``, written
asynchronously; each holds params, optimiser state, step, and as JSON the data position and seeds),
``metrics.jsonl`` (one line per ``eval_every`` steps: train loss, validation cross-entropy and Quad loss,
tokens/s, step time ``train_seconds`` and model FLOPs utilisation ``mfu`` (:mod:`sentcomp.training.throughput`),
learning rate, gradient norm, and the downstream probe's accuracies when it ran), ``curves.png`` (the losses,
validation metrics and probe accuracies of ``metrics.jsonl`` against the step, :mod:`sentcomp.results.plots`),
``results.json`` (headline, with ``data_stream_sha256``: a digest of every token the run read, in order, so two
runs can prove they saw the same data), ``model/`` (final weights in the family's Hugging Face layout, loadable by
``sentcomp.models.load`` with the Quad head, and by transformers' ``AutoModelForCausalLM``, which ignores it).

**Resume**: running again with the same workdir restores the latest checkpoint (metrics logged after it are
dropped) and continues; a run killed at any moment and resumed ends with the parameters an uninterrupted run
would have. A latest checkpoint that cannot be read is moved to ``checkpoints_corrupt/`` with a warning and the
previous one is used. The model has no dropout, so the data order is the run's only randomness: the seeds and
the data position in the checkpoint are what make resumption exact (a resume with other seeds is refused).

**The loop**: the steps run in :func:`sentcomp.training.loop.train_loop` (progress bar, timing, throughput,
metrics rows, checkpoints); the validation losses and the probe are its ``every(eval_every, ...)`` hook.

**Divergence**: a non-finite loss or parameters stop the run with
:class:`~sentcomp.training.loop.TrainingDiverged` naming the step; no checkpoint is written from then on, so the
last good one stays the latest.

**Downstream probe** (``probe.every`` > 0): features ``f(s)`` and ``Φp_f(s)`` of a task's texts + its prompt from
the current weights (:func:`sentcomp.features.extract_features`), a linear probe on each
(:func:`sentcomp.probe.evaluate`, ``probe.protocol``); test accuracies go into the same metrics line, so
accuracy-vs-loss curves come out of one run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentcomp import models, parallel
from sentcomp import probe as probe_lib
from sentcomp.data import corpora, get_task, load_task
from sentcomp.errors import SentcompError
from sentcomp.features import ExtractionOptions, extract_features
from sentcomp.models import layers, tokenizers
from sentcomp.models.base import COMPUTE_DTYPES, LanguageModel
from sentcomp.results import layout, plots, storage
from sentcomp.training import checkpoints, loop, steps, throughput, tracking

TOKENIZERS = {"gpt2": "gpt2_tokenizer", "bytes": "byte_tokenizer"}  # config.tokenizer -> sentcomp.models.tokenizers
CURVES_FILE = "curves.png"


# ------------------------------------------------------------------------------------------------ the model


def build_model(config) -> LanguageModel:
    """The LM to train: ``config.init.source`` loaded (pretrained, any causal family, with its own tokenizer;
    ``config.model``'s family and shape are then the checkpoint's), or a random model of ``config.model.family``
    and shape ``config.model`` (:func:`sentcomp.models.hf_model_config`) with ``config.tokenizer`` (``vocab_size`` 0 =
    the tokenizer's size). Either way ``quad_head`` adds the Quad head and untied Φ, and ``tie_word_embeddings=False``
    unties a tied Φ (a copy of the input embeddings to start from). The layer stack runs as ``config.model``'s
    execution keys say (:data:`sentcomp.models.layers.EXECUTION_FIELDS`: scanned or unrolled layers, remat policy,
    attention implementation), whichever the model's origin."""
    model = config.model
    if config.init.source:
        lm = models.load(config.init.source, quad_head=True if model.quad_head else None)
        if lm.family not in models.causal_families():
            raise SentcompError(f"Pretraining trains causal LMs ({', '.join(models.causal_families())}); "
                                f"{config.init.source!r} is a {lm.family!r} model.")
        lm = lm if model.tie_word_embeddings else models.untie(lm)
    else:
        if config.tokenizer not in TOKENIZERS:
            raise SentcompError(f"config.tokenizer must be one of {sorted(TOKENIZERS)}, got {config.tokenizer!r}.")
        tokenizer = getattr(tokenizers, TOKENIZERS[config.tokenizer])()
        lm = models.init(model.family, models.hf_model_config(model, model.vocab_size or len(tokenizer)),
                         jax.random.key(config.seed), quad_head=model.quad_head, tokenizer=tokenizer)
    lm = with_pretrained_parts(lm, config.init.get("phi_from", ""), config.init.get("embeddings_from", ""))
    return layers.with_execution(lm, **{key: model[key] for key in layers.EXECUTION_FIELDS if key in model})


def _donor_matrix(source: str, part: str, shape: tuple[int, ...]) -> jax.Array:
    """``part`` (``"phi"`` or ``"embeddings"``, ``[V, d]``) of the model ``models.load(source)``, shape-checked."""
    donor = models.load(source)
    matrix = donor.phi if part == "phi" else donor.params[models.facts(donor.family).input_embedding]["embedding"]
    if tuple(matrix.shape) != tuple(shape):
        raise SentcompError(
            f"config.init.{part}_from={source!r}: its {part} matrix is {tuple(matrix.shape)} (V × d) but the model "
            f"being trained needs {tuple(shape)}; use a model with the same vocabulary and width (set "
            "config.model.n_embd / vocab_size and config.tokenizer to match it)."
        )
    return jnp.asarray(matrix)


def with_pretrained_parts(lm: LanguageModel, phi_from: str = "", embeddings_from: str = "") -> LanguageModel:
    """``lm`` with Φ taken from the model ``phi_from`` and/or the input embeddings from ``embeddings_from`` (any
    source :func:`sentcomp.models.load` takes), every other parameter kept: the authors' option of starting Φ
    (and the input embeddings) from pretrained GPT-2 while the rest trains from scratch. A tied model's Φ *is*
    its input embedding table, so there the two must name the same source (or only one be given)."""
    if not phi_from and not embeddings_from:
        return lm
    embedding_key = models.facts(lm.family).input_embedding
    phi_key = lm.phi_param
    tied = phi_key == embedding_key
    if tied and phi_from and embeddings_from and phi_from != embeddings_from:
        raise SentcompError(
            f"config.init.phi_from={phi_from!r} and embeddings_from={embeddings_from!r} differ, but the model ties Φ "
            "to its input embeddings (one matrix): set config.model.tie_word_embeddings=False (or quad_head) to "
            "start them from different models."
        )
    params = dict(lm.params)
    dtype = lm.phi.dtype
    if embeddings_from or tied:
        table = _donor_matrix(embeddings_from or phi_from, "embeddings" if embeddings_from else "phi",
                              params[embedding_key]["embedding"].shape)
        params[embedding_key] = {**params[embedding_key], "embedding": table.astype(dtype)}
    if phi_from and not tied:
        params[phi_key] = _donor_matrix(phi_from, "phi", params[phi_key].shape).astype(dtype)
    return lm.replace(params=params)


def load_corpus(config, tokenizer, workdir: Path) -> dict[str, np.ndarray]:
    """Packed blocks of the corpus, built (or read from its cache ``workdir/corpus``) by process 0 alone and sent
    to the other processes, so hosts need no shared filesystem."""
    spec = corpora.CorpusSpec.from_config(config.data.corpus)
    return parallel.main_decides(lambda: corpora.load_blocks(spec, tokenizer, config.data.seq_len,
                                                             workdir / "corpus", progress=config.progress))


# -------------------------------------------------------------------------------------------------- probe


def probe_task_data(probe) -> dict[str, Any]:
    """Seeded subsets (``probe.num_train``/``num_test`` examples) of a task's train and test splits."""
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
    current = lm.replace(params=params)
    kinds = tuple(probe.features)
    extraction = ExtractionOptions(max_length=probe.max_length, batch_size=probe.batch_size, mesh=mesh, progress=False)
    fitting = probe_lib.ProbeOptions.from_config(probe, samples_per_label=probe.samples_per_label or None)
    features = {split: extract_features(current, data[split].texts, kinds, prompt=data["task"].prompt,
                                        options=extraction)
                for split in ("train", "test")}
    return {f"probe_{kind}": probe_lib.evaluate(features["train"][kind], data["train"].labels, features["test"][kind],
                                                data["test"].labels, options=fitting).test_accuracy
            for kind in kinds}


# ---------------------------------------------------------------------------------------------------- run


def check_config(config) -> None:
    if config.loss not in steps.LOSSES:
        raise SentcompError(f"config.loss must be one of {sorted(steps.LOSSES)}, got {config.loss!r}.")
    pretrainable = [name for name in models.causal_families() if models.facts(name).pretrain_config is not None]
    if config.model.family not in pretrainable:
        raise SentcompError(f"Unknown config.model.family {config.model.family!r}; choose one of {pretrainable}.")
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise SentcompError(f"config.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                            f"got {config.compute_dtype!r}.")
    for key in ("num_steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size"):
        if config[key] < 1:
            raise SentcompError(f"config.{key} must be ≥ 1, got {config[key]}.")
    if config.data.seq_len < 1:
        raise SentcompError(f"config.data.seq_len must be ≥ 1, got {config.data.seq_len}.")
    if not config.init.source and config.data.seq_len > config.model.n_positions:  # a loaded model: checked in run
        raise SentcompError(f"data.seq_len={config.data.seq_len} exceeds the model's context of "
                            f"{config.model.n_positions} (config.model.n_positions): lower one or raise the other.")
    if not config.optimizer.learning_rate > 0:
        raise SentcompError(f"config.optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}.")
    if config.batch_size % config.grad_accum:
        raise SentcompError(f"config.batch_size={config.batch_size} must be a multiple of "
                            f"grad_accum={config.grad_accum}.")
    if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
        raise SentcompError("config.checkpoint.every and config.checkpoint.keep must be ≥ 1.")
    steps.training_precision(config.get("matmul_precision", "auto"))
    parallel.mesh_shape(config.get("mesh"), jax.device_count())


def run(config, workdir) -> dict[str, Any]:
    """Trains (or resumes training) in ``workdir``; returns the headline metrics (also in ``results.json``)."""
    check_config(config)
    workdir = Path(workdir).resolve()
    mesh = parallel.make_mesh(config.get("mesh"))
    micro_batch = config.batch_size // config.grad_accum
    if micro_batch % mesh.size:
        raise SentcompError(f"Each micro-batch ({config.batch_size} // grad_accum {config.grad_accum} = {micro_batch} "
                            f"blocks) must split evenly over the {mesh.size} devices.")
    lm = build_model(config)
    if config.data.seq_len > lm.max_length:
        raise SentcompError(f"data.seq_len={config.data.seq_len} exceeds the model's context of {lm.max_length}.")
    blocks = load_corpus(config, lm.tokenizer, workdir)
    if int(blocks["train"].max()) >= lm.config.vocab_size:
        raise SentcompError(f"The corpus has token ids up to {int(blocks['train'].max())} but the model only "
                            f"{lm.config.vocab_size} embeddings; use a tokenizer matching the model.")
    host_rows = parallel.host_row_indices(micro_batch, mesh)
    plan = steps.DataPlan(blocks["train"], micro_batch, config.grad_accum, config.data.seed, host_rows)
    eval_batch = parallel.pad_to_multiple(config.eval_batch_size, mesh.size)
    val_batches = steps.validation_batches(blocks["validation"], config.eval_blocks, eval_batch,
                                     parallel.host_row_indices(eval_batch, mesh))

    frozen = lm.phi_param if config.init.freeze_phi else None
    optimizer = steps.make_optimizer(config.optimizer, config.num_steps, lm.params, frozen)
    seeds = {"seed": config.seed, "data_seed": config.data.seed, "settings": checkpoints.resume_settings(config)}
    manager, state, meta = checkpoints.resume(workdir, steps.initial_state(lm.params, optimizer, mesh),
                                              config.checkpoint.every, config.checkpoint.keep,
                                              config.checkpoint.asynchronous, expected=seeds,
                                              may_change=config.get("resume_may_change", ()))
    start = int(parallel.fetch(state["step"]))

    compute_dtype = COMPUTE_DTYPES[config.compute_dtype]
    train_step = steps.make_train_step(config.loss, lm.hidden_fn, lm.phi_fn, optimizer, compute_dtype, mesh,
                                       precision=steps.training_precision(config.get("matmul_precision", "auto")))
    eval_step = steps.make_eval_step(lm.hidden_fn, lm.phi_fn, compute_dtype, mesh)
    probe_data = probe_task_data(config.probe) if config.probe.every > 0 else None
    schedule = steps.learning_rate_schedule(config.optimizer, config.num_steps)
    tokens_per_step = config.batch_size * config.data.seq_len
    flops_per_step = tokens_per_step * throughput.lm_flops_per_token(
        lm, config.data.seq_len, output_projection=steps.computes_word_logits(config.loss))

    def batch(step: int) -> loop.Batch:
        return loop.Batch((parallel.global_batch(plan.local_tokens(step), mesh),), tokens_per_step, flops_per_step)

    def evaluate(done: loop.StepDone) -> dict[str, Any]:
        row = {"tokens": done.step * tokens_per_step,
               **steps.validation_losses(eval_step, done.state["params"], val_batches, mesh),
               "learning_rate": float(schedule(done.step - 1)), "grad_norm": float(done.metrics["grad_norm"])}
        row["val_loss"] = row[f"val_{config.loss}"]
        if probe_data is not None and (done.step % config.probe.every == 0 or done.step == config.num_steps):
            whole = parallel.replicate(done.state["params"], mesh)  # feature extraction takes replicated weights
            row.update(probe_accuracies(lm, whole, config.probe, probe_data, mesh))
        return row

    state, _ = loop.train_loop(
        state, train_step, batch, start, config.num_steps, [loop.every(config.eval_every, evaluate)],
        workdir=workdir, name=f"pretrain {config.loss}", progress=config.progress,
        checkpointing=loop.Checkpointing(manager, lambda step: {"step": step, **plan.position(step), **seeds},
                                         every=config.checkpoint.every),
        hardware=loop.Throughput(throughput.peak_flops(jax.local_devices()[0]), mesh.size),
        last_saved=start if meta is not None else None,
        hint=f"Lower optimizer.learning_rate (now {config.optimizer.learning_rate}) or optimizer.clip_norm, or use "
             "float32.")
    return finish(config, workdir, lm, state, plan)


def stream_digest(plan: steps.DataPlan, num_steps: int, chunk: int = 1 << 14) -> str:
    """SHA-256 of the token stream ``num_steps`` steps read: the token ids of the blocks at stream positions
    ``0 .. num_steps·B − 1`` in order (``B`` = global batch; step ``t`` reads positions ``t·B .. t·B + B − 1``,
    :func:`sentcomp.data.corpora.block_indices`). Two runs with equal digests trained on identical data."""
    digest = hashlib.sha256()
    total = num_steps * plan.global_batch
    for start in range(0, total, chunk):
        positions = np.arange(start, min(start + chunk, total))
        digest.update(np.ascontiguousarray(plan.blocks[corpora.block_indices(positions, len(plan.blocks),
                                                                              plan.seed)], np.int32).tobytes())
    return digest.hexdigest()


def finish(config, workdir: Path, lm: LanguageModel, state, plan: steps.DataPlan) -> dict[str, Any]:
    """Writes ``results.json``, ``curves.png`` and the final weights (``model/``, HF layout); returns the headline."""
    metrics = tracking.read_metrics(workdir) if parallel.is_main_process() else [{}]
    final = metrics[-1]
    step = int(parallel.fetch(state["step"]))
    results = {"loss": config.loss, "steps": step, "tokens": step * config.batch_size * config.data.seq_len,
               **{key: value for key, value in final.items() if key not in ("step", "tokens")},
               "train_blocks": int(len(plan.blocks)), "epochs": step * plan.global_batch / len(plan.blocks),
               "data_stream_sha256": stream_digest(plan, step)}
    trained = lm.replace(params=parallel.fetch(state["params"]))
    if parallel.is_main_process():
        models.save_hf(trained, workdir / "model", replace=True)  # with its tokenizer
        storage.write_json(workdir / layout.RESULTS_FILE, results)
        plots.training_curves({config.loss: metrics}, workdir / CURVES_FILE, f"pretraining ({config.loss})",
                              prefixes=plots.LEARNING_CURVES)
    return results
