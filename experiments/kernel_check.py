"""The paper's softmax/Quad identities checked with the kernels on a random model.

    python -m sentcomp.main --config=experiments/kernel_check.py --workdir=runs/kernel_check
    python -m sentcomp.main --config=experiments/kernel_check.py --workdir=runs/kernel_check_sweep --sweep

Writes results.json: the largest deviation of each identity (all should be ~1e-5 or below). The sweep runs
the check over vocabulary sizes × feature dimensions and tabulates the deviations in sweep.md.
"""

import ml_collections

from sentcomp.launcher import sweep
from sentcomp.launcher.config_files import parse_config_arg


def get_config(arg=None):
    args = parse_config_arg(arg, smoke=False)
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.kernel_check"
    config.vocab_size = 2000
    config.dim = 32
    config.n_contexts = 64
    config.seed = 0
    if args.smoke:
        config.vocab_size, config.n_contexts = 200, 8
    return config


def get_sweep(arg=None):
    args = parse_config_arg(arg, smoke=False)
    if args.smoke:
        return sweep.product(sweep.axis("vocab_size", [50, 200]), sweep.axis("dim", [8]))
    return sweep.product(sweep.axis("vocab_size", [500, 2000, 8000]), sweep.axis("dim", [8, 32]))
