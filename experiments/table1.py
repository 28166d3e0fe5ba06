"""The paper's Table 1: linear probes on f(s), Φp_f(s) and word-subset features, with and without the prompt,
plus zero-shot sentence completion (program: sentcomp.programs.table1; docs/table1.md).

    # the main job: rotten_tomatoes, SmolLM2-135M, 2,000 train / 500 test snippets (208 s wall on 2 idle cores,
    # float32 matmul 229 GFLOP/s, empty compilation cache, 2026-12-06: docs/table1.md)
    python -m sentcomp.main --config=experiments/table1.py --workdir=runs/table1
    # the full split (10,202 train / 2,550 test: 5.1× the snippets; not timed)
    python -m sentcomp.main --config=experiments/table1.py:full --workdir=runs/table1_full
    # other tasks / models / probes (tasks joined by '+'; data from TFDS or --config.data_dir files)
    python -m sentcomp.main --config=experiments/table1.py:task=sst2+agnews,model=gpt2,full --workdir=runs/t1_gpt2
    python -m sentcomp.main --config=experiments/table1.py:protocol=ridge --workdir=runs/table1_ridge
    # every task × protocol of get_sweep(), one workdir each
    python -m sentcomp.main --config=experiments/table1.py:full --workdir=runs/table1_sweep --sweep
    # tiny random GPT-2 (real GPT-2 tokenizer) on a few dozen rotten_tomatoes snippets (33 s wall with a warm
    # compilation cache at load ≈ 10, 2026-12-05: docs/table1.md)
    python -m sentcomp.main --config=experiments/table1.py:smoke --workdir=/tmp/table1_smoke
    # the paper's Table 1 as one sweep: GPT-2 on SST-2, SST-5, IMDb, AG News, MPQA, CR (full splits), the paper's
    # columns + BERT + fine-tuning + zero/few-shot; needs the downloads of docs/table1.md (The paper's sweep)
    python -m sentcomp.main --config=experiments/table1.py:paper --workdir=runs/table1_paper --sweep
    # the same composition, smoke-sized and offline (random GPT-2, rotten_tomatoes, MiniLM as BERT)
    python -m sentcomp.main --config=experiments/table1.py:paper,smoke --workdir=/tmp/table1_paper --sweep

Produces in the workdir: ``results.md`` (rows ``task`` / ``task*`` = with the prompt, columns f(s), Φp_f(s),
subset logits / log-probs / probs, class-word logits, pos/neg logits, zero-shot; then N train/test, the words
kept and dropped, each probe's chosen C; the zero/few-shot sections: accuracy [95% interval], ECE and Brier of
every scoring rule at each k of ``zeroshot.shots`` (default 0 and 2), and the prompt-sensitivity table over
templates × verbalizers), ``results.json``
(every number with its configuration), ``cells.jsonl`` (each finished cell, so a killed run resumes) and
``features/`` (the feature cache); the table is also printed.

Args (``key=value`` joined by commas): ``task`` (one name or several joined by ``+``), ``model`` (anything
``sentcomp.models.load`` takes, or ``random-gpt2``), ``n_train``/``n_test`` (seeded stratified subset sizes;
≤ 0 = all), ``full`` (the whole split), ``protocol`` (paper, senteval, mteb, ridge), ``smoke``, ``bert`` and
``ft`` (add the paper's baseline columns: BERT [CLS] features (``config.bert.model``; the smoke variant uses the
offline all-minilm-l6-v2) and full fine-tuning of the LM (``config.ft``), e.g.
``--config=experiments/table1.py:smoke,bert,ft``), ``paper`` (the paper's sweep: GPT-2, its tasks and columns,
BERT and FT on, full splits).

Why the main job uses 2,000 / 500 snippets, and what it costs: docs/table1.md (Main-job size and cost).
"""

import ml_collections

from sentcomp.launcher import sweep
from sentcomp.launcher.config_files import parse_config_arg

MAIN_JOB_TRAIN = 2000
MAIN_JOB_TEST = 500
ARG_DEFAULTS = dict(task="rotten_tomatoes", model="smollm2-135m", n_train=MAIN_JOB_TRAIN, n_test=MAIN_JOB_TEST,
                    full=False, protocol="paper", smoke=False, bert=False, ft=False, paper=False)
# The paper's Table 1: its tasks (get_sweep: one point each) and feature columns (p_f, the full V-dimensional
# distribution, left out: N × V floats on disk for IMDb's 50,000 reviews; its projection A p_f(s) kept).
PAPER_TASKS = ("sst2", "sst5", "imdb", "agnews", "mpqa", "cr")
# subset_probs (p_f(s) on the subset words) is the theory's natural classifier's input, not an authors' column.
PAPER_COLUMNS = ("f", "phi_p_f", "subset_logits", "subset_probs", "class_logits", "posneg_logits", "projected_p_f")


def get_config(arg=None):
    args = parse_config_arg(arg, **ARG_DEFAULTS)
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.table1"
    config.tasks = tuple(args.task.split("+"))
    config.model = args.model
    config.revision = ""  # the Hub revision of config.model (e.g. Pythia's "step1000"); "" = the default branch
    config.data_dir = ""  # local task files (see docs/tasks.md); "" = built-in data or TFDS's default
    config.data_source = "auto"  # auto, files, tfds, builtin
    config.n_train = 0 if args.full else args.n_train  # seeded stratified subset; ≤ 0: the whole split
    config.n_test = 0 if args.full else args.n_test
    config.n_repeats = 10  # tasks without an official split (MPQA, CR): seeded 90/10 splits, mean ± std
    config.seed = 0
    # more: "p_f" (the full next-word distribution, V-dim) and "projected_p_f" (A p_f(s), A a seeded random
    # orthonormal d × V matrix), the paper's other two feature sets
    config.columns = ("f", "phi_p_f", "subset_logits", "subset_log_probs", "subset_probs", "class_logits",
                      "posneg_logits")
    config.projection_seed = 0
    config.max_length = 512  # the paper's; longer documents lose their beginning, never the prompt
    config.truncation = "start"
    config.batch_size = 32
    config.compute_dtype = "float32"  # the LM's forward pass: "bfloat16" halves its memory (TPU/GPU fast path)
    config.probe = ml_collections.ConfigDict(dict(
        protocol=args.protocol,
        multi_class="ovr",  # the authors' one-vs-rest (identical to multinomial for binary tasks)
        # ... except their multinomial probes (solver sag) on SST-5's Φp_f, subset-word, class-word and
        # positive/negative features ("task:column" cells; f(s), p_f and projected_p_f stay one-vs-rest)
        multinomial_cells=tuple(f"sst5:{column}" for column in (
            "phi_p_f", "subset_logits", "subset_log_probs", "class_logits", "posneg_logits")),
        standardize=False,  # refused with the p_f column (probed through its kernel: exact only unscaled)
        p_f_memory_gb=0.0,  # the p_f column's N × N kernel + eigendecomposition must fit: 0 = memory available
        n_folds=5,
        shuffle_folds=True,  # False: sklearn's unshuffled StratifiedKFold, the authors' LogisticRegressionCV(cv=5)
        penalize_intercept=False,  # True: liblinear's penalised intercept (the authors' one-vs-rest solver)
        seed=0,
        max_iter=1000,
        n_experiments=10,  # protocol mteb: MTEB's 10 seeded experiments of samples_per_label examples per label
        samples_per_label=8,
    ))
    # Zero-/few-shot sentence completion (docs/zeroshot.md): every scoring rule (ll, acc_norm, pmi, calibrated) is
    # computed; `rule` picks the table's zero-shot column. `shots`: k of the scoring-rule table (task's first
    # template and verbalizer); `sensitivity_shots`: k at which every template × verbalizer is scored.
    # templates / verbalizers: () = each task's own; else prompts, and "w_label0;w_label1" strings (a label's
    # alternatives joined by ","). Demonstrations: seeded (`seed`), class-balanced, joined by `separator`.
    config.zeroshot = ml_collections.ConfigDict(dict(
        enabled=True, rule="ll", shots=(0, 2), sensitivity_shots=(0,), templates=(), verbalizers=(),
        balanced=True, separator="\n\n", seed=0, ece_bins=10,
    ))
    # The prompt row's probes again under each other zero-shot template (rows task*t1, ...) and after a k-shot
    # prefix (row task*k<shots>): one more feature extraction per template / split each, so off by default.
    config.prompt_probes = ml_collections.ConfigDict(dict(templates=False, shots=0))
    # The paper's baseline columns (on with the args bert / ft): BERT [CLS] features after the MLM transform
    # (pooling mlm_cls | cls | mean; a checkpoint without MLM head falls back to cls), and full fine-tuning of the
    # LM with a linear head (any field of sentcomp.training.finetune.FinetuneOptions; num_epochs > 0 sets max_steps).
    config.bert = ml_collections.ConfigDict(dict(enabled=args.bert, model="bert-base-cased", pooling="mlm_cls"))
    config.ft = ml_collections.ConfigDict(dict(
        enabled=args.ft, num_epochs=3, batch_size=16, eval_batch_size=64, eval_every=100, patience=5,
        val_fraction=0.1, dropout=0.1, aux_lm_weight=0.0, progress=True,
        optimizer=ml_collections.ConfigDict(dict(learning_rate=1e-5, warmup_steps=100)),
    ))
    # model=random-gpt2: a tiny random GPT-2 with the real GPT-2 tokenizer (smoke runs).
    config.random_gpt2 = ml_collections.ConfigDict(
        dict(n_embd=16, n_layer=1, n_head=2, n_positions=128, initializer_range=0.1)
    )
    if args.paper:
        config.model = "gpt2"
        config.tasks = (PAPER_TASKS[0],) if args.task == ARG_DEFAULTS["task"] and not args.smoke else config.tasks
        config.n_train = config.n_test = 0
        config.columns = PAPER_COLUMNS
        config.bert.enabled = config.ft.enabled = True
    if args.smoke:
        config.model = "random-gpt2"
        config.n_train, config.n_test = 48, 24
        config.max_length = 128
        config.batch_size = 16
        config.bert.model = "all-minilm-l6-v2"  # offline BERT-architecture encoder (no MLM head: [CLS] pooling)
        config.ft.update(num_epochs=4, eval_every=4, patience=3, progress=False)
        config.ft.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    return config


def get_sweep(arg=None):
    """The paper's tasks × probe protocols (data for tasks other than rotten_tomatoes: the Hub, TFDS or data_dir);
    with ``paper``, the paper's tasks under its protocol only (smoke: rotten_tomatoes, the one offline task)."""
    args = parse_config_arg(arg, **ARG_DEFAULTS)
    if args.paper:
        return sweep.axis("tasks", [("rotten_tomatoes",)] if args.smoke else [(task,) for task in PAPER_TASKS])
    tasks = ["rotten_tomatoes"] if args.smoke else [*PAPER_TASKS, "rotten_tomatoes"]
    return sweep.product(sweep.axis("tasks", [(task,) for task in tasks]),
                         sweep.axis("probe.protocol", ["paper", "ridge"]))
