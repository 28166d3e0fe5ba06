"""Checks a new machine (TPU, GPU or CPU): prints and writes a pass/fail table (the default config took 7 min 10 s on
the loaded 2-core CPU development machine, before the identities and multihost groups joined it: tpu_configs/README.md).

    # one machine, all its devices
    python -m sentcomp.main --config=experiments/device_check.py --workdir=runs/device_check
    # every host of a Cloud TPU slice (see tpu_configs/README.md)
    python -m sentcomp.main --config=experiments/device_check.py --workdir=$WORKDIR --distributed
    # tiny models, on CPU (what the test suite runs)
    python -m sentcomp.main --config=experiments/device_check.py:smoke --workdir=/tmp/device_check
    # some groups only, e.g. the paper's identities, or the multi-host group on every host of a slice
    python -m sentcomp.main --config=experiments/device_check.py:only=identities --workdir=runs/identities
    python -m sentcomp.main --config=experiments/device_check.py:only=multihost --workdir=$WORKDIR --distributed
    # the same at several seeds, as a sweep (run by all hosts together with --distributed)
    python -m sentcomp.main --config=experiments/device_check.py:only=multihost --workdir=$WORKDIR --sweep

Rows (sentcomp.programs.device_check documents each comparison): the kernels (streamed log Z, Φp_f, the Quad
loss's Gram trick, the ridge probe solver) against float64 numpy at their pinned precision; the paper's
softmax/Quad identities on a random softmax model (``identities``, formerly ``kernel_check.py``); a GPT-2-small-shaped
forward pass in ``compute_dtype`` against float32 at HIGHEST matmul precision; the logistic probe against
scikit-learn; an 8-step pretraining run saved and restored with Orbax (restored = saved, resumed = uninterrupted);
features on one device (per process) against all devices; the kernels on a globally sharded batch, an Orbax
checkpoint written by every process and restored (``multihost``, formerly ``multihost_check.py``); tokens/s and
MFU of a GPT-2-small forward pass and
train step (informational: they pass when they ran and are finite). Each row: check, what was compared, the
measured error or value, the tolerance, PASS/FAIL. The device (backend, kind, counts) heads the table.

Writes results.md and results.json (process 0) and prints the table on every process; if any check fails,
the run ends with an error naming the failed checks (after writing the table) and no done.json. Its output on
a CPU (the only backend it has run on so far) is in tpu_configs/README.md.

Arguments: ``smoke`` (tiny models); ``only=GROUP[+GROUP...]`` runs those groups (``--config.checks=(...)``
does the same with a tuple); ``--config.compute_dtype=float32`` checks the float32 path; ``--config.tolerance.*``
sets the bounds.
"""

import ml_collections

from sentcomp.errors import SentcompError
from sentcomp.launcher import sweep
from sentcomp.launcher.config_files import parse_config_arg

# every group, in the program's order (sentcomp.programs.device_check.CHECKS; this file loads without JAX)
CHECKS = ("kernels", "identities", "forward", "probe", "pretraining", "features", "multihost", "throughput")


def gpt2_shape(n_layer, n_embd, n_head, vocab_size, n_positions):
    return ml_collections.ConfigDict(dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                                          n_positions=n_positions))


def get_config(arg=None):
    args = parse_config_arg(arg, smoke=False, only="")
    config = ml_collections.ConfigDict()
    config.program = "sentcomp.programs.device_check"
    config.checks = tuple(args.only.split("+")) if args.only else CHECKS
    unknown = [name for name in config.checks if name not in CHECKS]
    if unknown:
        raise SentcompError(f"device_check.py:only={args.only}: no group {unknown[0]!r}; the groups are "
                            f"{'+'.join(CHECKS)}.")
    config.compute_dtype = "bfloat16"  # of the model forward, training and throughput rows: float32 or bfloat16
    config.seed = 0

    # random softmax model for the kernels: h [n_contexts, dim] (scaled so the softmax is peaked), Φ [V, dim]
    config.kernels = ml_collections.ConfigDict(dict(vocab_size=50257, dim=768, n_contexts=64, logit_scale=3.0,
                                                    ridge_rows=512, ridge_dim=64, ridge_alpha=1.0))
    config.probe = ml_collections.ConfigDict(dict(num_train=1000, num_test=500, dim=64, num_classes=3))
    # the paper's identities on a random softmax model: Φ [V, dim], n_contexts contexts θ and distributions p*
    config.identities = ml_collections.ConfigDict(dict(vocab_size=2000, dim=32, n_contexts=64))
    # the multi-host group: a global batch of n_contexts × positions (n_contexts must divide by the device count)
    config.multihost = ml_collections.ConfigDict(dict(n_contexts=64, positions=8, vocab_size=4000, dim=64))

    # the forward-precision and throughput rows: a random GPT-2 small (random token ids, no tokenizer needed)
    config.model = gpt2_shape(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    config.forward = ml_collections.ConfigDict(dict(batch_size=4, seq_len=128))
    config.throughput = ml_collections.ConfigDict(dict(batch_per_device=1, seq_len=256, repeats=3))

    # the pretraining and feature rows: a small GPT-2 with the byte-level tokenizer (V = 257)
    config.small_model = gpt2_shape(n_layer=2, n_embd=128, n_head=4, vocab_size=257, n_positions=128)
    config.pretraining = ml_collections.ConfigDict(dict(loss="xent", batch_size=16, seq_len=64, num_steps=8,
                                                        checkpoint_step=4))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=2, decay="cosine", end_lr_fraction=0.1,
        weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
    ))
    config.features = ml_collections.ConfigDict(dict(n_texts=64, batch_size=16))

    # bounds on max |Δ| / max |reference| (except where named); see sentcomp.programs.device_check
    config.tolerance = ml_collections.ConfigDict(dict(
        log_z=1e-5, phi_p_f=1e-4, quad=1e-4, ridge=1e-3,
        forward=ml_collections.ConfigDict(dict(float32=1e-2, bfloat16=5e-2)),
        probe_accuracy=0.0, probe_coef=1e-2,
        restored=0.0, resumed=1e-6,
        features=1e-5,
        identities=ml_collections.ConfigDict(dict(  # max |Δ| (absolute) of each identity
            conditional_mean_vs_grad_log_z=1e-5, conditional_mean_vs_float64=1e-5, xent_excess_vs_kl=1e-4,
            quad_excess_vs_half_sq_norm=1e-3)),
        multihost_checkpoint=1e-6,
    ))

    if args.smoke:
        config.kernels.update(vocab_size=3000, dim=32, n_contexts=16, ridge_rows=128, ridge_dim=16)
        config.probe.update(num_train=200, num_test=100, dim=16)
        config.small_model = gpt2_shape(n_layer=1, n_embd=32, n_head=2, vocab_size=257, n_positions=32)
        config.model = gpt2_shape(**config.small_model)  # one tiny model for every row
        config.forward.update(batch_size=2, seq_len=32)
        config.throughput.update(seq_len=16, repeats=1)
        config.pretraining.update(batch_size=8, seq_len=16)
        config.features.update(n_texts=16, batch_size=8)
        config.identities.update(vocab_size=200, n_contexts=8)
        config.multihost.update(n_contexts=16, positions=4, vocab_size=300, dim=16)
    return config


def get_sweep(arg=None):
    """The check at several seeds (2 with ``smoke``, else 3)."""
    return sweep.axis("seed", [0, 1] if parse_config_arg(arg, smoke=False, only="").smoke else [0, 1, 2])
