"""The quadratic log-partition assumption and the affine fit Φp_f ≈ A f + b on a real LM.

    python -m sentcomp.main --config=experiments/logpartition.py --workdir=runs/logpartition
    python -m sentcomp.main --config=experiments/logpartition.py:model=gpt2 --workdir=runs/logpartition_gpt2
    python -m sentcomp.main --config=experiments/logpartition.py:smoke --workdir=/tmp/logpartition_smoke

Default model: SmolLM2-135M (the offline GGUF asset); ``model=`` takes anything ``sentcomp.models.load``
accepts, or ``random-gpt2`` (what ``smoke`` uses: a tiny random GPT-2; 52 s in the test suite, docs/testing.md).
Contexts: Rotten Tomatoes snippets + " This movie is" (the paper's sentiment prompt). Produces results.json, results.md
(train/held-out R² of each fit) and log_partition_fit.png (fitted vs true log Z on held-out contexts).
"""

import ml_collections

from sentcomp.launcher.config_files import parse_config_arg


def get_config(arg=None):
    args = parse_config_arg(arg, model="smollm2-135m", num_texts=2000, smoke=False)
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.logpartition"
    config.model = args.model
    config.num_texts = args.num_texts  # ≤ 0: every snippet (12,752)
    config.prompt = " This movie is "
    config.max_length = 128  # snippets are short (~35 tokens); truncation drops the start, keeps the prompt
    config.batch_size = 16
    config.train_fraction = 0.5
    config.ridge = 1e-3  # on standardised features
    config.max_quadratic_terms = 2000  # above this many d(d+1)/2 terms, A lives in the top principal directions
    config.quadratic_rank = 32
    config.seed = 0
    # model=random-gpt2: a tiny random GPT-2 (d = 8, so even 100 contexts over-determine the full quadratic).
    config.random_gpt2 = ml_collections.ConfigDict(
        dict(n_embd=8, n_layer=1, n_head=2, n_positions=128, initializer_range=0.1)
    )
    if args.smoke:
        config.model = "random-gpt2"
        config.num_texts = 120  # 60 fitting contexts over-determine the 45 unknowns of its d = 8 quadratic
    return config
