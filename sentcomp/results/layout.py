"""The workdir layout (the contract every program keeps): what a run's folder holds, by name, and which config keys
decide its results.

Every program runs in a **workdir** (``python -m sentcomp.main --workdir=DIR``); the launcher, the programs, the
cross-run report and users' own scripts all find a run's files by these names (this module imports nothing heavy,
so a reader needs no JAX):

==================  ==========================================================================================
``config.json``     the launcher, at start: the whole config (a run's identity; a resume must match it)
``runs.jsonl``      the launcher: one provenance line per start (versions, commit, devices, command line)
``.lock``           the launcher: held while a run is going (one run per workdir)
``log.txt``         the sweep runner: a point's log
``error.txt``       the sweep runner: a failed point's traceback
``done.json``       the launcher, when the program returned: its headline numbers (the run finished)
``results.json``    the program: everything it measured; ``results.md`` / ``results.png`` its table and figure
``metrics.jsonl``   training programs: one row per logged step (dropped past the checkpoint a resume restores)
``cells.jsonl``     Table 1: one line per finished cell, keyed by what determines it
``tensorboard/``    training programs: the metrics as TensorBoard scalars
``checkpoints/``    training programs: Orbax checkpoints, one folder per step
``features/``       feature caches, keyed by content (model, texts, options, code)
``corpus/``         tokenised pretraining corpora, keyed by content
==================  ==========================================================================================

A **sweep folder** holds ``sweep.json`` / ``sweep.md`` (one row per point) and one workdir per point.

**Keys that do not decide results.** :data:`EXECUTION_KEYS` choose how a run executes (progress bars, the device
mesh, the layer stack's scan and rematerialisation, the attention kernel), not what it computes: a resumed run may
change them, and neither the launcher's config check nor a checkpoint's settings compare them. The config may also
list, under :data:`RESUME_MAY_CHANGE`, keys the user allows to change on resume (e.g. ``num_steps`` to train
longer).
"""

CONFIG_FILE = "config.json"
RUNS_FILE = "runs.jsonl"
LOCK_FILE = ".lock"
LOG_FILE = "log.txt"
ERROR_FILE = "error.txt"
DONE_FILE = "done.json"
RESULTS_FILE = "results.json"
RESULTS_MARKDOWN = "results.md"
RESULTS_FIGURE = "results.png"
METRICS_FILE = "metrics.jsonl"
CELLS_FILE = "cells.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
SWEEP_FILE = "sweep.json"
SWEEP_MARKDOWN = "sweep.md"

RECORD_FILES = (CONFIG_FILE, RUNS_FILE, LOCK_FILE, ERROR_FILE, LOG_FILE)  # the launcher's own record of a run
KEYED_CACHES = ("features", "corpus")  # caches keyed by everything that determines their content

EXECUTION_KEYS = ("progress", "mesh", "model.scan_layers", "model.remat", "model.attention", "model.attention_chunk")
RESUME_MAY_CHANGE = "resume_may_change"
