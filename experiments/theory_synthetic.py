"""The theory checked end to end on a language with exact p* (sentcomp.programs.theory_synthetic; docs/theory.md).

    python -m sentcomp.main --config=experiments/theory_synthetic.py --workdir=runs/theory_synthetic
    python -m sentcomp.main --config=experiments/theory_synthetic.py:smoke --workdir=/tmp/theory_smoke
    # three language/model seeds, one sweep
    python -m sentcomp.main --config=experiments/theory_synthetic.py --workdir=runs/theory_seeds --sweep

Pretrains a tiny GPT-2 with cross-entropy and one with the Quad loss (Quad architecture) on documents of the
synthetic HMM-with-label language, and at geometrically spaced checkpoints measures ε (exact KL to p*), the
excess Quad loss, downstream probe loss/accuracy on p_f, Φp_f and f, the theorem's bounds and the plug-in loss.

The defaults are chosen so that ε gets as low as a few CPU minutes allow: a small vocabulary (V = 16), few
hidden states and short documents (L = 4 body words, so γ = 1/(L+1) = 0.2 is large, and the bound, which
divides ε by γ, bites sooner). docs/theory.md explains why the bound is trivial (≥ log 2) until ε ≲ 1e-3 at γ = 1/9.

Arguments (``:key=value,...``): ``smoke`` (a 1-layer d=16 model, few steps: 58 s in the test
suite, docs/testing.md), ``steps=N``.

Produces (in the workdir): results.json (every checkpoint's record and the verdict), results.md (the table +
verdict), loss_vs_sqrt_epsilon.png (downstream loss vs √ε with the bound), epsilon_over_training.png, and per
loss a metrics.jsonl and Orbax checkpoints (re-running resumes).
"""

import ml_collections

from sentcomp.launcher import sweep
from sentcomp.launcher.config_files import parse_config_arg


def _args(arg):
    return parse_config_arg(arg, smoke=False, steps=0)


def get_config(arg=None):
    args = _args(arg)
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.theory_synthetic"
    config.seed = 0  # model initialisation
    config.losses = ("xent", "quad")
    config.language = ml_collections.ConfigDict(dict(
        seed=0, vocab_size=16, num_states=4, num_labels=2, body_length=4, answer_noise=0.1, label_signal=1.0,
        emission_scale=2.0, transition_scale=2.0,
    ))
    config.model = ml_collections.ConfigDict(dict(n_layer=2, n_embd=64, n_head=4))
    config.data = ml_collections.ConfigDict(dict(num_documents=200_000, seed=0))
    config.num_steps = 1500
    config.batch_size = 256  # documents per step
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=100, decay="cosine", end_lr_fraction=0.02,
        weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, clip_norm=1.0,
    ))
    config.evaluation = ml_collections.ConfigDict(dict(
        num_checkpoints=6, num_documents=1000, train_fraction=0.5, seed=0,
        probe_cv_metric="loss",  # probes pick C by held-out logistic loss, the quantity the bounds are about
        max_norms=(), penalties=(),  # the naturalness grids (empty = sentcomp.theory's defaults)
    ))
    config.checkpoint_keep = 2
    config.progress = True
    config.resume_may_change = ()
    if args.smoke:
        config.model.update(n_layer=1, n_embd=16, n_head=2)
        config.data.num_documents = 4096
        config.num_steps = 60
        config.batch_size = 64
        config.optimizer.update(learning_rate=1e-2, warmup_steps=5)
        config.evaluation.update(num_checkpoints=3, num_documents=400, max_norms=(0.0, 1.0, 4.0, 16.0, 64.0),
                                 penalties=(1e-1, 1e-3, 1e-5))
    if args.steps:
        config.num_steps = args.steps
    return config


def get_sweep(arg=None):
    """Three seeds of the language and of the model initialisation."""
    return sweep.zip(sweep.axis("language.seed", [0, 1, 2]), sweep.axis("seed", [0, 1, 2]))
