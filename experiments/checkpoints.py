"""Downstream accuracy across a checkpoint series: each checkpoint's validation cross-entropy and Table-1 probes,
in one table and plots (a composed config: sentcomp.launcher.stages; docs/checkpoints.md).

    # Pythia-70M at eight Hub revisions, step1000 ... step143000 (the default; each revision downloaded once,
    # ~170 MB; needs the network or the HF cache)
    python -m sentcomp.main --config=experiments/checkpoints.py --workdir=runs/pythia70m_series
    # several model sizes (every model × every revision), points labelled by size
    python -m sentcomp.main --workdir=runs/pythia_sizes \
        --config=experiments/checkpoints.py:model=EleutherAI/pythia-70m+EleutherAI/pythia-160m,revisions=step1000+step143000
    # local directories (HF layout, or training runs' workdirs) as the checkpoints, with their training steps
    python -m sentcomp.main --config=experiments/checkpoints.py:revisions=/ckpt/a+/ckpt/b,steps=1000+2000 \
        --workdir=runs/mine
    # a tiny GPT-2 pretrained by sentcomp in two chained stages, each one a checkpoint (the test suite's run)
    python -m sentcomp.main --config=experiments/checkpoints.py:smoke --workdir=/tmp/checkpoints_smoke
    # task × probe protocol sweep (get_sweep), a whole series per point
    python -m sentcomp.main --config=experiments/checkpoints.py --workdir=runs/series_sweep --sweep

Stages, run in this order into WORKDIR/<stage>/ (each resumable; a finished checkpoint is never redone):

1. per checkpoint ``<c>``: ``loss_<c>`` (``sentcomp.programs.lm_loss``: validation cross-entropy and perplexity on
   ``corpus``, packed with the model's tokenizer) and ``table1_<c>`` (``sentcomp.programs.table1`` with
   experiments/table1.py's protocol: f(s), Φp_f(s), word-subset features, with and without the prompt);
2. ``compare``: ``sentcomp.programs.compare_checkpoints`` reads their ``results.json``: ``results.md`` /
   ``results.json`` (a row per checkpoint: step, size, val xent, perplexity, every probe accuracy) and
   ``accuracy_vs_val_xent.png``, ``accuracy_vs_step.png``.

Arguments (``:key=value,...``): ``model`` (Hub names joined by ``+``; empty: the revisions are local sources),
``revisions`` (joined by ``+``: Hub revisions such as ``step1000``, or local directories when ``model`` is empty;
default: Pythia's eight above, of ``model`` or ``EleutherAI/pythia-70m``),
``steps`` (training steps joined by ``+``, one per revision; default: the number in a revision named
``step<N>``), ``task`` (Table-1 tasks joined by ``+``), ``corpus`` (``lee`` or ``enwiki`` offline, ``wikitext``
with ``--config.wikitext_path``), ``smoke``. Shared settings, linked to every stage: ``seq_len``,
``eval_blocks`` (validation blocks; ≤ 0 = all), ``n_train``, ``n_test``, ``seed``, ``probe_protocol``.
"""

import re
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from sentcomp.errors import SentcompError
from sentcomp.launcher import sweep
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_module, parse_config_arg

ARG_DEFAULTS = dict(model="", revisions="", steps="", task="rotten_tomatoes", corpus="enwiki", smoke=False)
PYTHIA_REVISIONS = "+".join(f"step{step}" for step in (1000, 3000, 10000, 20000, 40000, 80000, 110000, 143000))
SMOKE_STAGES = 2  # smoke without revisions: a tiny GPT-2 pretrained in this many chained stages
SMOKE_STEPS = 5  # optimiser steps per smoke pretraining stage


def _args(arg):
    return parse_config_arg(arg, **ARG_DEFAULTS)


def stage_label(text: str) -> str:
    """A stage-name-safe label: ``"EleutherAI/pythia-70m"`` -> ``"pythia_70m"``, ``"/ckpt/step_2"`` -> ``"step_2"``."""
    return re.sub(r"\W+", "_", Path(text.rstrip("/")).name).strip("_") or "checkpoint"


def revision_step(revision: str) -> int:
    """The training step in a revision's name (``"step1000"`` -> 1000, ``".../step_20"`` -> 20); -1 if none."""
    found = re.search(r"step_?(\d+)", Path(revision.rstrip("/")).name)
    return int(found.group(1)) if found else -1


def checkpoint_list(args) -> list[dict]:
    """``[{"label", "model", "revision", "step"}]``: every model × revision (Hub), or each revision as a local
    source (``model`` empty); steps from ``args.steps`` or the revision names."""
    revisions = [r for r in str(args.revisions).split("+") if r]
    names = [m for m in str(args.model).split("+") if m]
    steps = [int(s) for s in str(args.steps).split("+") if s] if args.steps != "" else None
    if steps is not None and len(steps) != len(revisions):
        raise SentcompError(f"steps= gives {len(steps)} values for {len(revisions)} revisions; give one per revision.")
    steps = steps or [revision_step(r) for r in revisions]
    pairs = [(name, r, s) for name in names for r, s in zip(revisions, steps)] if names else \
        [(r, "", s) for r, s in zip(revisions, steps)]
    checkpoints = [{"label": stage_label(f"{name}_{r}" if len(names) > 1 else r if names else name), "model": name,
                    "revision": r, "step": s} for name, r, s in pairs]
    labels = [c["label"] for c in checkpoints]
    if len(set(labels)) != len(labels):
        raise SentcompError(f"Two checkpoints share a label ({labels}); give distinct revisions or directories.")
    return checkpoints


def loss_config(args) -> ml_collections.ConfigDict:
    """The ``sentcomp.programs.lm_loss`` config (model and revision set per checkpoint)."""
    pretrain = load_module(EXPERIMENTS_DIR / "pretrain.py")
    return ml_collections.ConfigDict(dict(
        program="sentcomp.programs.lm_loss", model="", revision="", step=-1,
        corpus=pretrain.corpus_config(args.corpus), seq_len=512, eval_blocks=256, batch_size=16,
        compute_dtype="float32", progress=not args.smoke,
    ))


def table1_config(args) -> ml_collections.ConfigDict:
    """experiments/table1.py's config (model and revision set per checkpoint)."""
    config = load_module(EXPERIMENTS_DIR / "table1.py").get_config(f"task={args.task}" + (",smoke" if args.smoke
                                                                                           else ""))
    if args.smoke:  # tiny byte-level or random models: the dense features only, no zero-shot
        config.columns = ("f", "phi_p_f")
        config.zeroshot.enabled = False
        config.max_length = 64
    return config


def smoke_pretraining(args) -> list[tuple[str, ml_collections.ConfigDict, dict]]:
    """The smoke variant's own series: ``train_<i>`` continues ``train_<i-1>``'s model for SMOKE_STEPS steps."""
    pretrain = load_module(EXPERIMENTS_DIR / "pretrain.py")
    stages = []
    for index in range(1, SMOKE_STAGES + 1):
        config = pretrain.get_config("smoke")
        config.num_steps = config.eval_every = config.checkpoint.every = SMOKE_STEPS
        config.probe.every = 0
        config.progress = False
        if index > 1:
            config.init.source = f"stage:train_{index - 1}"
        step = index * SMOKE_STEPS
        stages.append((f"train_{index}", config,
                       {"label": f"step{step}", "model": f"stage:train_{index}", "revision": "", "step": step}))
    return stages


def get_config(arg=None):
    args = _args(arg)
    if args.smoke and not args.revisions:
        args.corpus = "lee"
    elif not args.revisions:  # the default series: Pythia's public checkpoints
        args.model, args.revisions = args.model or "EleutherAI/pythia-70m", PYTHIA_REVISIONS
    config = ml_collections.ConfigDict()
    # shared settings: every stage field linked here follows it (also a sweep point's or --config.X's value)
    config.seq_len = 64 if args.smoke else 512
    config.eval_blocks = 32 if args.smoke else 256
    config.seed = 0
    config.probe_protocol = "paper"
    table1 = table1_config(args)
    config.n_train, config.n_test = table1.n_train, table1.n_test
    if args.corpus == "wikitext":
        config.wikitext_path = config_dict.placeholder(str)  # WikiText's folder (Hub layout), required

    config.stages = ml_collections.ConfigDict()
    order = []
    pretraining = smoke_pretraining(args) if args.smoke and not args.revisions else []
    for name, stage, _ in pretraining:
        config.stages[name] = stage
        order.append(name)
    checkpoints = [c for _, _, c in pretraining] or checkpoint_list(args)
    for checkpoint in checkpoints:
        loss, probes = loss_config(args), table1_config(args)
        for stage in (loss, probes):
            stage.model, stage.revision = checkpoint["model"], checkpoint["revision"]
        loss.step = checkpoint["step"]
        loss.seq_len, loss.eval_blocks = config.get_ref("seq_len"), config.get_ref("eval_blocks")
        if args.corpus == "wikitext":
            loss.corpus.path = config.get_ref("wikitext_path")
        probes.seed = config.get_ref("seed")
        probes.n_train, probes.n_test = config.get_ref("n_train"), config.get_ref("n_test")
        probes.probe.protocol = config.get_ref("probe_protocol")
        config.stages[f"loss_{checkpoint['label']}"] = loss
        config.stages[f"table1_{checkpoint['label']}"] = probes
        order += [f"loss_{checkpoint['label']}", f"table1_{checkpoint['label']}"]
    config.stages.compare = ml_collections.ConfigDict(dict(
        program="sentcomp.programs.compare_checkpoints",
        labels=tuple(c["label"] for c in checkpoints),
        loss_runs=tuple(f"stage:loss_{c['label']}" for c in checkpoints),
        table1_runs=tuple(f"stage:table1_{c['label']}" for c in checkpoints),
    ))
    config.stage_order = (*order, "compare")
    return config


def get_sweep(arg=None):
    """The probe protocols (each point a whole series)."""
    return sweep.axis("probe_protocol", ["paper", "ridge"])
