"""Multi-host sanity check: kernels on a globally sharded batch + an Orbax checkpoint written by all processes.

    # one machine, all its devices
    python -m sentcomp.main --config=experiments/multihost_check.py --workdir=runs/multihost_check
    # every host of a Cloud TPU slice (see tpu_configs/README.md)
    python -m sentcomp.main --config=experiments/multihost_check.py --workdir=$WORKDIR --distributed
    # the same at several seeds, as a sweep run by all hosts together
    python -m sentcomp.main --config=experiments/multihost_check.py --workdir=$WORKDIR --distributed --sweep

Writes results.json (loss, gradient and feature norms, checkpoint round-trip error, process/device counts),
(also for features from the real extraction pipeline on a tiny random GPT-2)
arrays.npz (the loss, gradients and features) and checkpoint/. The numbers must not depend on how many
processes or devices ran it (n_contexts must divide by the device count).
"""

import ml_collections

from sentcomp.launcher import sweep
from sentcomp.launcher.config_files import parse_config_arg


def get_config(arg=None):
    args = parse_config_arg(arg, smoke=False)
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.multihost_check"
    config.n_contexts = 64  # the global batch; must divide by the number of devices
    config.positions = 8
    config.vocab_size = 4000
    config.dim = 64
    config.seed = 0
    if args.smoke:
        config.n_contexts, config.positions, config.vocab_size, config.dim = 16, 4, 300, 16
    return config


def get_sweep(arg=None):
    return sweep.axis("seed", [0, 1] if parse_config_arg(arg, smoke=False).smoke else [0, 1, 2])
