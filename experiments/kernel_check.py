"""The paper's softmax/Quad identities checked with the kernels on a random model.

    python -m sentcomp.main --config=experiments/kernel_check.py --workdir=runs/kernel_check

Writes results.json: the largest deviation of each identity (all should be ~1e-5 or below).
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.kernel_check"
    config.vocab_size = 2000
    config.dim = 32
    config.n_contexts = 64
    config.seed = 0
    if arg == "smoke":
        config.vocab_size, config.n_contexts = 200, 8
    return config
