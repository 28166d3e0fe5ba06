"""A real LM as p*: students distilled from SmolLM2-135M's next-word distributions with soft cross-entropy and soft
Quad (and trained on the plain next word), exact ε on real text, the theorem's bound checked across checkpoints,
Table-1 probes per checkpoint and the teacher's as the ceiling (docs/teacher.md).

    # the test suite's run (a tiny random teacher, byte-level tokenizer, 64 blocks of news; 2 min 47 s wall at load
    # ≈ 11 on the 2-core machine, 2026-12-05: docs/teacher.md)
    python -m sentcomp.main --config=experiments/teacher.py:smoke --workdir=/tmp/teacher_smoke
    # the CPU experiment (SmolLM2-135M teacher; Rotten Tomatoes train reviews without the probed snippets, movie
    # synopses, news; 50 min on 2 idle cores, 2026-12-05: docs/teacher.md)
    python -m sentcomp.main --config=experiments/teacher.py --workdir=runs/teacher
    # the same with the task's prompt after every review (docs/teacher.md, "The prompted variant")
    python -m sentcomp.main --config=experiments/teacher.py:prompted,objectives=soft_xent+soft_quad \
        --workdir=runs/teacher_prompted
    # sized for one modern GPU; --dry_run prints its FLOPs and expected time (config.estimate)
    python -m sentcomp.main --config=experiments/teacher.py:accelerator --workdir=runs/teacher_gpu --dry_run

Stages (WORKDIR/<stage>/, each resumable; a finished one is skipped on a re-run):

1. ``targets`` (sentcomp.programs.teacher_targets): corpus, the teacher's sparse targets (k chosen by the
   truncation KL it loses), the teacher's features on held-out text and at the task's prompt position, the
   task's naturalness frontier.
2. ``student_<objective>_lr<i>`` (sentcomp.programs.distill), for each objective of ``objectives`` and each
   learning rate of ``learning_rates``: same model shape, seed, data order and steps; ε, excess Quad loss, the
   bound at each of ``eval_steps`` (0 = the untrained student), snapshots for the probes.
3. ``table1_<student>_<step>`` (sentcomp.programs.table1) on every snapshot after step 0, ``table1_untrained`` on
   the untrained student (all students are one model at step 0: same seed and shape), and ``table1_teacher``: f(s) and
   Φp_f(s) (word subsets too with the real tokenizer), with and without the prompt, on Rotten Tomatoes snippets
   that no student read (``corpus.unseen_probe``: the corpus leaves out every snippet these stages probe).
4. ``report`` (sentcomp.programs.teacher_report): one table, bound_vs_epsilon.png; per objective the learning
   rate with the lowest final validation loss of its own objective (never test accuracy) is marked.

    # what was measured on a busy CPU (docs/teacher.md): the same stages, cut down
    python -m sentcomp.main --config=experiments/teacher.py:quick --workdir=runs/teacher_quick

Arguments (``:key=value,...``): ``smoke``, ``quick``, ``accelerator`` (variants; default: the CPU experiment),
``prompted`` (the corpus is the train-split reviews each followed by the task's prompt, ``rt_reviews_prompted``:
the teacher's targets then include its completion of every review's own task context; with any variant),
``objectives`` (joined by ``+``; default ``soft_xent+soft_quad+xent``: the plain next-word student is the
paper's objective on the same data and steps).
"""

import ml_collections

from sentcomp.errors import SentcompError
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_module, parse_config_arg

ARG_DEFAULTS = dict(smoke=False, quick=False, accelerator=False, prompted=False,
                    objectives="soft_xent+soft_quad+xent")
DATA_SETTINGS = ("data_dir", "data_source", "n_train", "n_test", "n_repeats", "seed")  # of the Table-1 stages
# SmolLM2's tokens per whole source (+1 EOS per document), counted 2026-12-05 with sentcomp.teacher.source_documents
# and the teacher's tokenizer; the corpus is a little smaller (the probed snippets are left out of rt_reviews)
SOURCE_TOKENS = {"rt_reviews": 264_139, "rt_plots": 156_630, "lee": 75_380, "enwiki": 654_259}
SOURCE_TOKENS["rt_reviews_prompted"] = SOURCE_TOKENS["rt_reviews"] + 3 * 10_201  # + " This movie is" per review
SMOLLM2_SHAPE = dict(n_layer=30, n_embd=576, n_head=9, kv_heads=3, ffn=1536, vocab=49152)  # shared/ASSETS.md


def _args(arg):
    args = parse_config_arg(arg, **ARG_DEFAULTS)
    if args.smoke + args.quick + args.accelerator > 1:
        raise SentcompError("Choose one variant: smoke, quick or accelerator (or none, the CPU experiment).")
    return args


def apply_quick(config) -> None:
    """The ``quick`` variant: the CPU experiment cut to what a busy 2-core machine runs in 21 min (docs/teacher.md; 80
    train blocks = 10 k teacher-labelled tokens, one learning rate, 60 steps of a 2-layer d=64 student, 100 task
    contexts, probes on 200 train / 100 test snippets): it shows the pipeline on the real teacher, not a result."""
    config.stages.targets.corpus.update(max_train_blocks=80, eval_blocks=8)
    config.stages.targets.targets.sample_blocks = 8
    config.stages.targets.task.num_contexts = 100
    for name in config.stage_order:
        stage = config.stages[name]
        if stage.program == "sentcomp.programs.distill":
            stage.model.update(n_embd=64, n_head=2)
            stage.update(num_steps=60, batch_size=8, eval_steps=(0, 20, 60))
            stage.optimizer.warmup_steps = 6
        elif stage.program == "sentcomp.programs.table1":
            stage.n_train, stage.n_test = 200, 100


def targets_config(args) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.teacher_targets"
    config.teacher = ml_collections.ConfigDict(dict(
        source="random" if args.smoke else "smollm2-135m", seed=0,
        random=dict(family="llama", n_layer=1, n_embd=32, n_head=2, n_positions=64, intermediate_size=128,
                    tie_word_embeddings=True, logit_scale=30.0)))
    config.corpus = ml_collections.ConfigDict(dict(
        # in-domain text first: max_train_blocks keeps the first blocks of the sources in this order
        sources=("lee",) if args.smoke else ("rt_reviews_prompted",) if args.prompted
        else ("rt_reviews", "rt_plots", "lee", "enwiki") if args.accelerator else ("rt_reviews", "rt_plots", "lee"),
        seq_len=32 if args.smoke else 512 if args.accelerator else 128,
        validation_fraction=0.05, seed=0, max_train_blocks=64 if args.smoke else 0 if args.accelerator else 4000,
        eval_blocks=8 if args.smoke else 64))
    config.targets = ml_collections.ConfigDict(dict(
        k_candidates=(4, 16, 64) if args.smoke else (16, 32, 64, 128, 256), tolerance=0.05,
        sample_blocks=4 if args.smoke else 16, chunk_blocks=8))
    config.task = ml_collections.ConfigDict(dict(
        name="rotten_tomatoes", num_contexts=48 if args.smoke else 400, seed=0, max_length=64 if args.smoke else 128,
        num_words=0 if args.smoke else 1024,  # the frontier's v lives on these words (0 = all V)
        batch_size=16, max_norms=(0.0, 1.0, 4.0, 16.0) if args.smoke else (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0,
                                                                            64.0)))
    config.progress = not args.smoke
    return config


def student_config(args, objective: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.distill"
    config.targets = "stage:targets"
    config.objective = objective
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        family="llama", n_layer=1 if args.smoke else 4 if args.accelerator else 2,
        n_embd=32 if args.smoke else 512 if args.accelerator else 128, n_head=2 if args.smoke else 8 if
        args.accelerator else 4, n_positions=64 if args.smoke else 512, tie_word_embeddings=True))
    config.model.intermediate_size = 4 * config.model.n_embd
    config.data = ml_collections.ConfigDict(dict(seed=0))
    config.num_steps = 12 if args.smoke else 3000 if args.accelerator else 300
    config.batch_size = 8 if args.smoke else 64 if args.accelerator else 16
    config.grad_accum = 1
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    config.compute_dtype = "bfloat16" if args.accelerator else "float32"
    config.matmul_precision = "auto"  # the loss's products: sentcomp.training.steps.training_precision
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=2 if args.smoke else 30, decay="cosine", end_lr_fraction=0.1,
        weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))
    config.eval_steps = ((0, 12) if args.smoke else (0, 20, 60) if args.quick else (0, 300, 1000, 3000)
                         if args.accelerator else (0, 50, 150, 300))
    config.eval_batch_size = 8 if args.smoke else 16
    config.task_max_length = 64 if args.smoke else 128
    config.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=2, asynchronous=False))
    config.progress = not args.smoke
    return config


def table1_config(args, model: str) -> ml_collections.ConfigDict:
    table1 = load_module(EXPERIMENTS_DIR / "table1.py")
    config = table1.get_config("task=rotten_tomatoes" + (",smoke" if args.smoke else ""))
    config.model = model
    config.zeroshot.enabled = False
    if args.smoke:  # the byte-level tokenizer has no single-token word forms: only the dense features
        config.columns = ("f", "phi_p_f")
        config.max_length = 64
        config.probe.protocol = "mteb"
    else:
        config.max_length = 128
        config.n_train, config.n_test = 1000, 500
    return config


def estimate(config) -> ml_collections.ConfigDict:
    """FLOPs of the accelerator variant (sentcomp.training.throughput's per-token counts) and the time they take at a
    stated peak and MFU: an estimate, not a measurement."""
    from sentcomp.training import throughput

    t = SMOLLM2_SHAPE
    head = t["n_embd"] // t["n_head"]
    teacher_params = t["n_layer"] * (2 * t["n_embd"] ** 2 + 2 * t["n_embd"] * t["kv_heads"] * head
                                     + 3 * t["n_embd"] * t["ffn"]) + t["vocab"] * t["n_embd"]
    seq_len = config.stages.targets.corpus.seq_len
    corpus_tokens = sum(SOURCE_TOKENS[source] for source in config.stages.targets.corpus.sources)
    teacher_flops = corpus_tokens * throughput.transformer_flops_per_token(
        teacher_params, t["n_layer"], t["n_embd"], seq_len, training=False)
    students = [name for name in config.stage_order if name.startswith("student_")]
    flops = teacher_flops
    for name in students:
        student = config.stages[name]
        m = student.model
        params = m.n_layer * (4 * m.n_embd ** 2 + 3 * m.n_embd * 4 * m.n_embd) + t["vocab"] * m.n_embd
        tokens = student.num_steps * student.batch_size * seq_len
        flops += tokens * throughput.transformer_flops_per_token(params, m.n_layer, m.n_embd, seq_len)
    peak, mfu = throughput.table_peak("h100"), 0.3
    return ml_collections.ConfigDict(dict(
        flops=flops, teacher_flops=teacher_flops,
        device="H100 (bf16 dense peak, sentcomp.training.throughput.PEAK_FLOPS)",
        peak_flops=peak, assumed_mfu=mfu, expected_seconds=flops / (peak * mfu),
        note="training and teacher forward FLOPs only; evaluation, probes and I/O not counted; not measured"))


def get_config(arg=None):
    args = _args(arg)
    objectives = args.objectives.split("+")
    config = ml_collections.ConfigDict()
    config.learning_rates = (3e-3,) if args.smoke or args.quick else (1e-3, 3e-3)
    config.stages = ml_collections.ConfigDict()
    config.stages.targets = targets_config(args)
    students = []
    for objective in objectives:
        for index, rate in enumerate(config.learning_rates):
            name = f"student_{objective}_lr{index}"
            student = student_config(args, objective)
            student.optimizer.learning_rate = rate
            config.stages[name] = student
            students.append(name)
    # the untrained students are one model (same seed and shape; the learning rate acts only from step 1): its
    # probes are run once, on the first student's step-0 snapshot
    probes, untrained = [], f"stage:{students[0]}/snapshots/step_0"
    config.stages.table1_untrained = table1_config(args, untrained)
    for name in students:
        for step in config.stages[name].eval_steps:
            stage = "table1_untrained" if step == 0 else f"table1_{name}_{step}"
            if step:
                config.stages[stage] = table1_config(args, f"stage:{name}/snapshots/step_{step}")
            probes.append((name, step, f"stage:{stage}"))
    teacher_model = "stage:targets/model" if args.smoke else "smollm2-135m"
    config.stages.table1_teacher = table1_config(args, teacher_model)
    columns = tuple(config.stages.table1_teacher.columns)
    config.stages.report = ml_collections.ConfigDict(dict(
        program="sentcomp.programs.teacher_report", targets="stage:targets",
        students=tuple((name, f"stage:{name}") for name in students), table1_runs=tuple(probes),
        teacher_table1="stage:table1_teacher", probe_rows=("rotten_tomatoes*", "rotten_tomatoes"),
        probe_columns=columns))
    probe_stages = [stage[len("stage:"):] for _, step, stage in probes if step]
    config.stage_order = ("targets", *students, "table1_untrained", *probe_stages, "table1_teacher", "report")
    config.sweep_selection = ml_collections.ConfigDict({name: f"{name}/val_loss" for name in students})
    if args.quick:
        apply_quick(config)
    # every snippet the Table-1 stages probe (they share these data settings) is left out of the corpus
    probe_data = {key: config.stages.table1_teacher[key] for key in DATA_SETTINGS}
    config.stages.targets.corpus.unseen_probe = ml_collections.ConfigDict(probe_data)
    if args.accelerator:
        config.estimate = estimate(config)
    return config
