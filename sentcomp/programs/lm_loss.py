"""A language model's validation cross-entropy on a text corpus: one checkpoint's loss, for a checkpoint series.

    python -m sentcomp.main --config=experiments/checkpoints.py:smoke --workdir=/tmp/checkpoints_smoke

(a stage of ``experiments/checkpoints.py``, once per checkpoint). ``run(config, workdir)`` loads ``config.model``
(anything :func:`sentcomp.models.load` takes) at the Hub revision ``config.revision`` (``""`` = the default
branch), packs ``config.corpus`` (:mod:`sentcomp.data.corpora`: a corpus config as pretraining uses) with the
model's own tokenizer into blocks of ``config.seq_len + 1`` tokens (cached in ``workdir/corpus``), and averages
the next-token cross-entropy over every target position of the first ``config.eval_blocks`` validation blocks
(all if ≤ 0), data-parallel, with training's own eval step (:func:`sentcomp.training.steps.make_eval_step`,
:func:`sentcomp.training.steps.validation_losses`): the number a pretraining run logs as ``val_xent``.

Writes ``results.json``: ``val_xent`` (nats/token), ``val_perplexity`` (``exp(val_xent)``), ``tokens`` (target
positions averaged over), ``blocks``, ``parameters`` (the model's parameter count), and ``model``, ``revision``,
``step`` (the training step ``config.step``; None when
< 0: unknown), ``family``, ``seq_len``; returns the same numbers as its headline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sentcomp import models, parallel
from sentcomp.data import corpora
from sentcomp.errors import SentcompError
from sentcomp.models.base import COMPUTE_DTYPES
from sentcomp.results import layout, storage
from sentcomp.training.steps import make_eval_step, validation_batches, validation_losses


def check_config(config) -> None:
    """Clear errors for values the run cannot use, before any work: sizes, dtype, the model found offline."""
    if config.seq_len < 1 or config.batch_size < 1:
        raise SentcompError(f"config.seq_len ({config.seq_len}) and config.batch_size ({config.batch_size}) "
                            "must be ≥ 1.")
    models.hf.check_source(config.model, config.revision, known=tuple(models.ALIASES))
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise SentcompError(f"config.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                            f"got {config.compute_dtype!r}.")


def parameter_count(params) -> int:
    """The number of scalars in a parameter pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def run(config, workdir) -> dict[str, Any]:
    """Measures the validation cross-entropy of ``config.model`` at ``config.revision``; writes results.json."""
    check_config(config)
    workdir = Path(workdir).resolve()
    lm = models.load(config.model, revision=config.revision)
    if config.seq_len > lm.max_length:
        raise SentcompError(f"config.seq_len={config.seq_len} exceeds the model's context of {lm.max_length}.")
    spec = corpora.CorpusSpec.from_config(config.corpus)
    blocks = parallel.main_decides(lambda: corpora.load_blocks(spec, lm.tokenizer, config.seq_len,
                                                               workdir / "corpus", progress=config.progress))
    mesh = parallel.data_mesh()
    batch = parallel.pad_to_multiple(config.batch_size, mesh.size)
    batches = validation_batches(blocks["validation"], config.eval_blocks, batch,
                                 parallel.host_row_indices(batch, mesh))
    eval_step = make_eval_step(lm.hidden_fn, lm.phi_fn, COMPUTE_DTYPES[config.compute_dtype], mesh)
    losses = validation_losses(eval_step, parallel.replicate(lm.params, mesh), batches, mesh)
    used = blocks["validation"][:config.eval_blocks] if config.eval_blocks > 0 else blocks["validation"]
    results = {"model": config.model, "revision": config.revision, "step": config.step if config.step >= 0 else None,
               "family": lm.family,
               "parameters": parameter_count(lm.params), "seq_len": config.seq_len, "blocks": int(len(used)),
               "tokens": int(used.shape[0] * (used.shape[1] - 1)), "val_xent": losses["val_xent"],
               "val_perplexity": math.exp(losses["val_xent"])}
    if parallel.is_main_process():
        storage.write_json(workdir / layout.RESULTS_FILE, results)
    print(f"{config.model}{'@' + config.revision if config.revision else ''}: validation cross-entropy "
          f"{results['val_xent']:.4f} nats/token (perplexity {results['val_perplexity']:.2f}) over "
          f"{results['tokens']:,} tokens")
    return {key: results[key] for key in ("val_xent", "val_perplexity", "tokens", "parameters")}
