"""The teacher's side of a distillation experiment, computed once (sentcomp.teacher; docs/teacher.md).

``run(config, workdir)`` with the teacher ``config.teacher`` (``source``: anything :func:`sentcomp.models.load`
takes, e.g. ``"smollm2-135m"``; or ``"random"``: a small random decoder of shape ``config.teacher.random``,
pretraining's ``config.model`` keys (:func:`sentcomp.models.hf_model_config`), with the byte-level
tokenizer, for smoke runs) writes into ``workdir``:

* ``corpus/``: the offline corpus (``config.corpus.sources``) packed with the teacher's tokenizer, without the
  snippets the Table-1 stages probe (:func:`probe_snippets`);
* ``targets/<key>/``: the sparse targets (top-k ids and probabilities, exact entropy, truncation KL) at every
  train position, resumable chunk by chunk; ``k`` = the smallest of ``config.targets.k_candidates`` whose mean
  truncation ``KL(p_T ‖ p̃)`` on the first ``sample_blocks`` train blocks is ≤ ``tolerance`` nats;
* ``teacher.npz``: the teacher's Φ ``[V, d_T]``, its features at every position of ``eval_blocks`` validation
  blocks (a seeded sample, ``corpus.seed``, of all the sources' held-out blocks, kept in corpus order), those
  blocks themselves; the task's contexts (``config.task``: a seeded subset of
  the task's *test* split, which no student sees) with labels, the teacher's features at the prompt position,
  and the naturalness frontier ``(τ_k, B_k, v_k)`` of ``p_T`` there;
* ``tokenizer/`` (the students' tokenizer), ``model/`` (a random teacher's weights, for the Table-1 stage),
  ``results.json`` (k and the truncation KL by candidate, the measured truncation KL over every stored
  position, counts).

Re-running resumes: the corpus and every finished target chunk are reused; ``teacher.npz`` is rewritten.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from sentcomp import models, parallel
from sentcomp import teacher as teacher_lib
from sentcomp.data import get_task, load_task
from sentcomp.errors import SentcompError
from sentcomp.evaluators.task_data import prepare_task
from sentcomp.features import extract_features
from sentcomp.models import tokenizers
from sentcomp.results import layout, storage

ARRAYS_FILE = "teacher.npz"


def build_teacher(config):
    """The teacher: ``config.teacher.source`` loaded, or a random decoder (``"random"``, byte-level tokenizer)."""
    spec = config.teacher
    if spec.source != "random":
        lm = models.load(spec.source)
        if lm.family not in models.causal_families():
            raise SentcompError(f"The teacher must be a causal LM ({', '.join(models.causal_families())}); "
                                f"{spec.source!r} is a {lm.family!r} model.")
        return lm
    shape = spec.random
    tokenizer = tokenizers.byte_tokenizer()
    lm = models.init(shape.family, models.hf_model_config(shape, len(tokenizer)), jax.random.key(spec.seed),
                     tokenizer=tokenizer)
    # sharpen the random teacher's next-word distributions (a random init is close to uniform)
    params = dict(lm.params)
    key = lm.phi_param
    params[key] = jax.tree.map(lambda x: x * shape.logit_scale, params[key])
    return lm.replace(params=params, name=f"random-{shape.family}-teacher-seed{spec.seed}")


def heldout_sample(n_blocks: int, n_chosen: int, seed: int) -> np.ndarray:
    """Indices of ``n_chosen`` of ``n_blocks`` held-out blocks (all if fewer), drawn by a seeded permutation and
    sorted: every source's held-out text is represented, not only the first source's."""
    return np.sort(np.random.default_rng(seed).permutation(n_blocks)[:n_chosen])


def probe_snippets(config) -> list[str]:
    """Every snippet the Table-1 stages probe (train and test, :func:`sentcomp.evaluators.task_data.prepare_task`
    of ``config.task.name`` under ``config.corpus.unseen_probe``, the Table-1 stages' data settings), which the
    corpus leaves out so that no student reads them; none without ``unseen_probe``."""
    settings = config.corpus.get("unseen_probe")
    if not settings:
        return []
    data = prepare_task(config.task.name, settings)
    return [text for train, test in data.pairs for text in (*train.texts, *test.texts)]


def task_contexts(config):
    """``(texts, labels, prompt)``: a seeded subset of the task's test split (``config.task.num_contexts``)."""
    task = get_task(config.task.name)
    test = load_task(task)["test"]
    rng = np.random.default_rng(config.task.seed)
    n = min(config.task.num_contexts, len(test)) if config.task.num_contexts > 0 else len(test)
    chosen = np.sort(rng.permutation(len(test))[:n])
    return [test.texts[i] for i in chosen], np.asarray(test.labels)[chosen], task.prompt


def check_config(config) -> None:
    if config.teacher.source == "random" and config.teacher.random.family not in models.causal_families():
        raise SentcompError(f"config.teacher.random.family must be one of {list(models.causal_families())}.")
    unknown = sorted(set(config.corpus.sources) - set(teacher_lib.SOURCES))
    if unknown:
        raise SentcompError(f"Unknown config.corpus.sources {unknown}; choose from {teacher_lib.SOURCES}.")
    if not config.targets.k_candidates or min(config.targets.k_candidates) < 1:
        raise SentcompError("config.targets.k_candidates must be a non-empty tuple of k ≥ 1.")
    for key in ("seq_len", "eval_blocks"):
        if config.corpus[key] < 1:
            raise SentcompError(f"config.corpus.{key} must be ≥ 1, got {config.corpus[key]}.")


def run(config, workdir) -> dict:
    check_config(config)
    if jax.process_count() > 1:
        raise SentcompError("The teacher-targets stage runs on one process; run it without --distributed.")
    workdir = Path(workdir).resolve()
    lm = build_teacher(config)
    corpus = config.corpus
    excluded = probe_snippets(config)
    blocks = teacher_lib.corpus_blocks(corpus.sources, lm.tokenizer, corpus.seq_len, corpus.validation_fraction,
                                       corpus.seed, workdir / "corpus", progress=config.progress, exclude=excluded)
    train = blocks["train"][:corpus.max_train_blocks] if corpus.max_train_blocks > 0 else blocks["train"]
    validation = blocks["validation"][heldout_sample(len(blocks["validation"]), corpus.eval_blocks, corpus.seed)]
    if int(max(train.max(), validation.max())) >= lm.config.vocab_size:
        raise SentcompError("The corpus has token ids beyond the teacher's vocabulary; use the teacher's tokenizer.")

    by_k = teacher_lib.truncation_kl_by_k(lm, train[:config.targets.sample_blocks], config.targets.k_candidates)
    k = teacher_lib.choose_k(by_k, config.targets.tolerance)
    targets = teacher_lib.build_targets(lm, train, k, workdir / "targets", config.targets.chunk_blocks,
                                        progress=config.progress)

    phi = np.asarray(lm.phi, np.float32)
    val_hidden = teacher_lib.teacher_hidden(lm, validation, config.targets.chunk_blocks)
    texts, labels, prompt = task_contexts(config)
    task_hidden = extract_features(lm, texts, ("f",), prompt=prompt, max_length=config.task.max_length,
                                   batch_size=config.task.batch_size, progress=False)["f"]
    frontier = teacher_lib.task_frontier(task_hidden, phi, labels, tuple(config.task.max_norms),
                                         config.task.num_words)
    remaining = 1.0 - targets["probs"].astype(np.float64).sum(-1)
    results = {
        "teacher": lm.name, "vocab_size": int(lm.config.vocab_size), "k": int(k),
        "truncation_kl_by_k": {str(key): value for key, value in by_k.items()},
        "truncation_kl": {"mean": float(targets["truncation_kl"].mean()), "max": float(targets["truncation_kl"].max())},
        "remaining_mass": {"mean": float(remaining.mean()), "max": float(remaining.max())},
        "teacher_entropy": float(targets["entropy"].mean()),
        "train_blocks": int(len(train)), "train_positions": int(targets["entropy"].size),
        "excluded_probe_snippets": len(excluded),
        "validation_blocks": int(len(validation)), "seq_len": int(corpus.seq_len),
        "task": config.task.name, "task_contexts": len(texts), "prompt": prompt,
        "frontier": {"max_norm": frontier["max_norm"].tolist(), "tau": frontier["tau"].tolist(),
                     "words": len(frontier["words"])},
        "targets_folder": str(Path("targets") / teacher_lib.targets_key(lm, train, k)),
    }
    if parallel.is_main_process():
        teacher_lib.save_arrays(workdir / ARRAYS_FILE, {
            "phi": phi, "validation_blocks": validation, "validation_hidden": val_hidden, "train_blocks": train,
            "task_hidden": np.asarray(task_hidden, np.float32), "task_labels": labels,
            "task_texts": np.asarray(texts, dtype=object).astype(str), "frontier_max_norm": frontier["max_norm"],
            "frontier_tau": frontier["tau"], "frontier_word_weights": frontier["word_weights"]})
        lm.tokenizer.save_pretrained(str(workdir / "tokenizer"))
        if config.teacher.source == "random":
            models.save_hf(lm, workdir / "model")
            lm.tokenizer.save_pretrained(str(workdir / "model"))
        storage.write_json(workdir / layout.RESULTS_FILE, results)
    return {"k": int(k), "truncation_kl": results["truncation_kl"]["mean"],
            "teacher_entropy": results["teacher_entropy"], "train_positions": results["train_positions"]}
