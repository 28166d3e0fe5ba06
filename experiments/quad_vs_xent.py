"""The paper's pretraining claim end to end: the same GPT-2 pretrained with cross-entropy and with Quad, then the
Table-1 evaluation of each (a composed config: sentcomp.launcher.stages; docs/quad_vs_xent.md).

    # the test suite's run (byte-level tokenizer, 300 news articles, tiny model)
    python -m sentcomp.main --config=experiments/quad_vs_xent.py:smoke --workdir=/tmp/quad_vs_xent_smoke
    # the CPU demo (gensim's Wikipedia extract, small GPT-2 with GPT-2's tokenizer, Rotten Tomatoes; 46.7 min wall
    # at load 11–17 on the 2-core development machine: docs/quad_vs_xent.md)
    python -m sentcomp.main --config=experiments/quad_vs_xent.py:cpu --workdir=runs/quad_vs_xent_cpu
    # our default plan: GPT-2 small + Quad head on WikiText-103 (on disk), for a TPU/GPU slice (the paper's own
    # corpus and budget are unknown: docs/quad_vs_xent.md)
    python -m sentcomp.main --config=experiments/quad_vs_xent.py --workdir=runs/quad_vs_xent \
        --config.wikitext_path=/data/wikitext
    # learning rates (get_sweep): a whole experiment per point; sweep.md names the best point per loss,
    # chosen by the model's own validation loss (never by test accuracy)
    python -m sentcomp.main --config=experiments/quad_vs_xent.py:cpu --workdir=runs/quad_vs_xent_sweep --sweep
    # what would run, stage by stage
    python -m sentcomp.main --config=experiments/quad_vs_xent.py:cpu --workdir=runs/quad_vs_xent_cpu --dry_run

Stages, run in this order into WORKDIR/<stage>/ (each resumable; a finished one is skipped on a re-run):

1. ``pretrain_xent``, 2. ``pretrain_quad``: ``sentcomp.programs.pretrain`` with experiments/pretrain.py's settings
   (the paper's Quad architecture, an extra d×d layer and untied Φ, for both), identical except ``loss``: same
   architecture, corpus, data order, token budget, seeds (``seed`` sets both the initialisation and the data
   order), learning rate. Each logs validation cross-entropy and Quad loss, tokens/s, and an in-loop probe.
3. ``table1_xent``, 4. ``table1_quad``: ``sentcomp.programs.table1`` (experiments/table1.py's protocol) on the
   model the pretraining stage saved (``model = "stage:pretrain_<loss>"``): f(s), Φp_f(s), word-subset features,
   with and without the task's prompt, zero-shot. For the Quad model only f(s) is the paper's feature; the other
   columns are computed too and marked in the comparison.
5. ``compare``: ``sentcomp.programs.compare_pretraining`` reads the four runs' records: ``results.md`` /
   ``results.json`` (one table: loss × features × task row, validation losses, tokens/s; whether both read the
   same token stream) and ``accuracy_vs_tokens.png`` / ``accuracy_vs_val_xent.png``.

Arguments (``:key=value,...``): ``smoke``, ``cpu`` (variants; default: our GPT-2-small plan), ``task`` (Table-1
tasks joined by ``+``; default rotten_tomatoes, the one labelled set available offline). Shared settings, set
once for both losses (linked to every stage): ``seed``, ``learning_rate``, ``num_steps``.
"""

import ml_collections
from ml_collections import config_dict

from sentcomp.errors import SentcompError
from sentcomp.launcher import sweep
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_module, parse_config_arg

LOSSES = ("xent", "quad")
ARG_DEFAULTS = dict(smoke=False, cpu=False, task="rotten_tomatoes")


def _args(arg):
    args = parse_config_arg(arg, **ARG_DEFAULTS)
    if args.smoke and args.cpu:
        raise SentcompError("Choose one variant: smoke or cpu (or neither, the GPT-2-small default).")
    return args


def pretrain_config(args, loss: str) -> ml_collections.ConfigDict:
    """experiments/pretrain.py's config for ``loss`` in the chosen variant."""
    pretrain = load_module(EXPERIMENTS_DIR / "pretrain.py")
    if args.smoke:
        config = pretrain.get_config(f"loss={loss},smoke")
        config.probe.update(task=args.task.split("+")[0])
        return config
    config = pretrain.get_config(f"loss={loss},corpus={'enwiki' if args.cpu else 'wikitext'}")
    if args.cpu:  # sized for 2 busy CPU cores: both losses + evaluation took 46.7 min (docs/quad_vs_xent.md)
        config.model.update(n_positions=128, n_layer=2, n_embd=128, n_head=4)
        config.data.seq_len = 128
        config.batch_size = 16
        config.optimizer.update(learning_rate=3e-3, warmup_steps=16)
        config.eval_every = 20
        config.eval_blocks = 32
        config.checkpoint.update(every=40, keep=2)
        config.probe.update(every=40, num_train=1000, num_test=500, max_length=128)
    config.probe.update(task=args.task.split("+")[0])
    return config


def table1_config(args, loss: str) -> ml_collections.ConfigDict:
    """experiments/table1.py's config on the model of stage ``pretrain_<loss>``."""
    table1 = load_module(EXPERIMENTS_DIR / "table1.py")
    config = table1.get_config(f"task={args.task}" + (",smoke" if args.smoke else "" if args.cpu else ",full"))
    config.model = f"stage:pretrain_{loss}"
    if args.smoke:  # the byte-level tokenizer has no single-token word forms: only the dense features
        config.columns = ("f", "phi_p_f")
        config.zeroshot.enabled = False
        config.max_length = 64
    if args.cpu:
        config.max_length = 128  # the model's context
    return config


def get_config(arg=None):
    args = _args(arg)
    config = ml_collections.ConfigDict()
    pretrains = {loss: pretrain_config(args, loss) for loss in LOSSES}
    # shared settings: every stage field linked here follows it (a sweep point sets it once for both losses)
    config.seed = 0
    config.learning_rate = pretrains["xent"].optimizer.learning_rate
    config.num_steps = 160 if args.cpu else pretrains["xent"].num_steps
    default_plan = not (args.smoke or args.cpu)
    if default_plan:
        config.wikitext_path = config_dict.placeholder(str)  # WikiText-103's folder (Hub layout), required
    for pretrain in pretrains.values():
        pretrain.seed = config.get_ref("seed")
        pretrain.data.seed = config.get_ref("seed")
        pretrain.optimizer.learning_rate = config.get_ref("learning_rate")
        pretrain.num_steps = config.get_ref("num_steps")
        if default_plan:
            pretrain.data.corpus.path = config.get_ref("wikitext_path")

    config.stages = ml_collections.ConfigDict()
    for loss in LOSSES:
        config.stages[f"pretrain_{loss}"] = pretrains[loss]
    for loss in LOSSES:
        config.stages[f"table1_{loss}"] = table1_config(args, loss)
    config.stages.compare = ml_collections.ConfigDict(dict(
        program="sentcomp.programs.compare_pretraining",
        pretrain_runs=tuple(f"stage:pretrain_{loss}" for loss in LOSSES),
        table1_runs=tuple(f"stage:table1_{loss}" for loss in LOSSES),
    ))
    config.stage_order = (*(f"pretrain_{loss}" for loss in LOSSES), *(f"table1_{loss}" for loss in LOSSES), "compare")
    # a sweep's summary names, per loss, the point with the lowest of this headline metric (its own validation loss)
    config.sweep_selection = ml_collections.ConfigDict({loss: f"{loss}/val_loss" for loss in LOSSES})
    return config


def get_sweep(arg=None):
    """Peak learning rates around each variant's default; each point is a whole two-loss experiment."""
    args = _args(arg)
    rates = [1e-3, 3e-3, 1e-2] if args.smoke or args.cpu else [3e-4, 6e-4, 1.2e-3]
    return sweep.axis("learning_rate", rates)
