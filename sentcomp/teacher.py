"""A real pretrained LM as the true distribution ``p*``: teacher targets, exact ε and the theorem's bound on real text.

The theory (../shared/PAPER.md) is stated against the unknown true next-word distribution ``p*``. Taking a
pretrained LM (the *teacher*, e.g. the offline SmolLM2-135M) as ``p* := p_T`` makes every quantity exact on real
text: a student ``p_f`` trained on the teacher's distributions has ``ε = E_s KL(p_T(.|s) ‖ p_f(.|s))``, the task's
naturalness ``(τ, B)`` is computed from ``p_T`` at the prompt position, and the bound ``τ + sqrt(2B²ε/γ)`` can
be set beside what the student's features achieve. This module holds the pieces the distillation programs
compose (the maths is in :mod:`sentcomp.kernels.distill`):

* **Corpus** (:func:`distillation_documents`, :func:`corpus_blocks`): documents of the offline sources
  (``rt_reviews``: the review snippets of the Rotten Tomatoes task's *train* split, text only, so no student
  ever sees a test snippet or any label, and the snippets the probes are trained on are left out too
  (``exclude``); ``rt_reviews_prompted``: the same reviews, each followed by the task's prompt " This movie is",
  so that the teacher's target at the prompt's last token is its completion of the task's own context;
  ``rt_plots``: the 1,083 unique movie synopses of the Rotten Tomatoes file, which belong to no task split;
  ``lee``: gensim's 300 news articles; ``enwiki``: gensim's Wikipedia extract), each source split into
  train/validation by :func:`sentcomp.data.corpora.hold_out`, packed into blocks with the teacher's tokenizer
  (:func:`sentcomp.data.corpora.pack`); cached, keyed by the sources, tokenizer, block length and excluded texts.
* **Sparse teacher targets** (:func:`choose_k`, :func:`build_targets`): per position the teacher's top-k words
  and probabilities (remaining mass spread uniformly, :func:`sentcomp.kernels.top_k_targets`), its exact
  entropy ``H(p_T)`` and the truncation's ``KL(p_T ‖ p̃)``; k is the smallest candidate whose mean truncation
  KL on a sample of blocks is within a tolerance. Stored chunk by chunk (resumable, each chunk checksummed),
  keyed by the teacher's fingerprint (:attr:`sentcomp.models.base.LanguageModel.fingerprint`), the blocks and k.
* **Held-out teacher states** (:func:`teacher_hidden`): ``f_T(s)`` at every validation position, so exact
  ``KL(p_T ‖ p_f)`` needs only the student (:func:`sentcomp.kernels.kl_from_features`).
* **The theory on the task** (:func:`task_frontier`, :func:`bound_check`): ``p_T`` at the prompt position of
  the task's contexts, the naturalness frontier ``τ(B)`` (:func:`sentcomp.theory.naturalness_frontier`), and
  for a student, per frontier point ``(τ_k, B_k, v_k)``: its plug-in loss ``E ℓ(v_kᵀp_f, y)`` beside
  ``τ_k + sqrt(2B_k²ε_T)`` with ``ε_T`` the mean KL on those same contexts. With everything on one sample the
  empirical task distribution is the task, the coverage is γ = 1, and the bound is an exact inequality:
  ``ℓ(v ᵀp_f, y) ≤ ℓ(vᵀp_T, y) + B‖p_f − p_T‖₁ ≤ ℓ(vᵀp_T, y) + B·sqrt(2 KL)`` per context (1-Lipschitz
  loss, Hölder, Pinsker), then Jensen on the mean of the square roots.
"""

from __future__ import annotations

import bz2
import csv
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sentcomp import kernels, theory
from sentcomp.data import corpora, get_task, rotten_tomatoes
from sentcomp.data.text import tokenizer_fingerprint
from sentcomp.errors import SentcompError
from sentcomp.kernels.softmax_features import DEFAULT_VOCAB_CHUNK
from sentcomp.models.base import LanguageModel
from sentcomp.results import storage

PROMPTED_REVIEWS = "rt_reviews_prompted"
SOURCES = ("rt_reviews", PROMPTED_REVIEWS, "rt_plots", "lee", "enwiki")
MANIFEST = "manifest.json"
TARGET_FIELDS = ("ids", "probs", "truncation_kl", "entropy")  # the order kernels.top_k_targets returns


# ------------------------------------------------------------------------------------------------ the corpus


def rotten_tomatoes_plots(path: str | Path | None = None) -> list[str]:
    """The ``plot`` rows (movie synopses) of the Rotten Tomatoes file, unique, in file order: real movie text that
    is in no task split (the task keeps only ``fresh``/``rotten`` snippets)."""
    path = Path(path) if path is not None else rotten_tomatoes.corpus_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        texts = [(row.get("text") or "").strip() for row in csv.DictReader(file) if row.get("category") == "plot"]
    return list(dict.fromkeys(text for text in texts if text))


def rotten_tomatoes_train_reviews() -> list[str]:
    """The review snippets of the Rotten Tomatoes task's train split (:mod:`sentcomp.data.rotten_tomatoes`'s fixed
    split), text only, in split order: in-domain text for the students that holds no test snippet and no label."""
    return list(rotten_tomatoes.load_rotten_tomatoes()["train"].texts)


def source_documents(source: str, exclude: Sequence[str] = ()) -> list[str]:
    """The documents of one offline source (see the module docstring), but those equal to a text of ``exclude``.
    ``rt_reviews_prompted``: the documents of ``rt_reviews``, each followed by the Rotten Tomatoes task's prompt
    (trailing space stripped, as features append it)."""
    if source == PROMPTED_REVIEWS:
        prompt = get_task("rotten_tomatoes").prompt.rstrip()
        return [review + prompt for review in source_documents("rt_reviews", exclude)]
    if source == "rt_reviews":
        documents = rotten_tomatoes_train_reviews()
    elif source == "rt_plots":
        documents = rotten_tomatoes_plots()
    elif source in ("lee", "enwiki"):
        documents = (corpora.read_lines(corpora.gensim_file("lee")) if source == "lee"
                     else corpora.read_wiki_dump(corpora.gensim_file("enwiki")))
    else:
        raise SentcompError(f"Unknown distillation corpus source {source!r}; choose from {SOURCES}.")
    excluded = set(exclude)
    return [document for document in documents if document not in excluded]


def distillation_documents(sources: Sequence[str], validation_fraction: float, seed: int,
                           exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """``{"train", "validation"}``: every source's documents but those equal to a text of ``exclude`` (the
    snippets the probes read, so that no student reads them), each source split by ``corpora.hold_out``."""
    if not sources:
        raise SentcompError(f"The distillation corpus needs at least one source of {SOURCES}.")
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for source in sources:
        for split, held in corpora.hold_out(source_documents(source, exclude), validation_fraction, seed).items():
            splits[split] += held
    return splits


def corpus_blocks(sources: Sequence[str], tokenizer, seq_len: int, validation_fraction: float, seed: int,
                  cache_dir: Path, progress: bool = False, exclude: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Packed blocks ``{"train", "validation": int32 [n, seq_len + 1]}`` of :func:`distillation_documents`,
    cached in ``cache_dir/<key>/`` (key: sources, tokenizer definition, block length, split settings, the
    excluded texts)."""
    folder = Path(cache_dir) / storage.content_hash(list(sources), tokenizer_fingerprint(tokenizer), seq_len,
                                                    validation_fraction, seed, sorted(set(exclude)))
    cached = corpora.read_cached_blocks(folder)
    if cached is not None:
        return cached
    documents = distillation_documents(sources, validation_fraction, seed, exclude)
    blocks = {split: corpora.pack(corpora.token_stream(tokenizer, documents[split], progress=progress), seq_len)
              for split in corpora.SPLITS}
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": list(sources), "seq_len": seq_len, "excluded_texts": len(set(exclude)),
                **{f"{s}_blocks": len(blocks[s]) for s in blocks}}
    for split, array in blocks.items():
        storage.save_npy(folder / f"{split}.npy", array)
        manifest[f"{split}_sha256"] = storage.content_hash((folder / f"{split}.npy").read_bytes())
    storage.write_json(folder / corpora.MANIFEST, manifest)
    return blocks


# ------------------------------------------------------------------------------------- the teacher's targets


@functools.partial(jax.jit, static_argnums=(0, 4))
def _block_targets(hidden_fn, params, phi, inputs, k):
    hidden = hidden_fn(params, inputs, jnp.ones_like(inputs))
    logits = jnp.einsum("btd,vd->btv", hidden, phi, precision="highest", preferred_element_type=jnp.float32)
    return kernels.top_k_targets(logits, k)


def truncation_kl_by_k(teacher: LanguageModel, blocks: np.ndarray, candidates: Sequence[int]) -> dict[int, float]:
    """Mean ``KL(p_T ‖ p̃_k)`` over every position of ``blocks`` for each candidate k (what truncation loses)."""
    inputs = jnp.asarray(blocks[:, :-1])
    return {int(k): float(np.mean(_block_targets(teacher.hidden_fn, teacher.params, teacher.phi, inputs, int(k))[2]))
            for k in sorted(candidates)}


def choose_k(measured: dict[int, float], tolerance: float) -> int:
    """The smallest k whose mean truncation KL is ≤ ``tolerance`` nats (the largest candidate if none is)."""
    within = [k for k, kl in sorted(measured.items()) if kl <= tolerance]
    return within[0] if within else max(measured)


def _checked_load(path: Path, digest: str | None) -> np.ndarray | None:
    """The array at ``path`` if its bytes hash to ``digest``; None if missing or damaged (it is recomputed)."""
    if digest is None or not path.exists():
        return None
    data = path.read_bytes()
    return np.load(path) if storage.content_hash(data) == digest else None


def targets_key(teacher: LanguageModel, blocks: np.ndarray, k: int) -> str:
    """The store's key: the teacher (name, config, every weight), the code computing targets, the blocks, k."""
    return storage.content_hash(teacher.fingerprint, storage.code_fingerprint(
        __name__, "sentcomp.kernels.distill", getattr(teacher.hidden_fn, "func", teacher.hidden_fn).__module__),
        storage.content_hash(np.ascontiguousarray(blocks).tobytes()), k)


def build_targets(teacher: LanguageModel, blocks: np.ndarray, k: int, directory: Path, chunk_blocks: int = 8,
                  progress: bool = False) -> dict[str, np.ndarray]:
    """The teacher's sparse targets at every target position of ``blocks [n, T+1]``: ``ids [n, T, k]`` (uint16 when
    V ≤ 65,536), ``probs [n, T, k]`` float32, ``truncation_kl [n, T]`` and ``entropy [n, T]`` (exact ``H(p_T)``).

    Written to ``directory/<key>/`` (:func:`targets_key`) chunk by chunk (``chunk_blocks`` blocks), each file with
    its checksum in ``<field>.<chunk>.sha``: a re-run computes only missing or damaged chunks."""
    folder = Path(directory) / targets_key(teacher, blocks, k)
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_json(folder / MANIFEST, {"teacher": teacher.name, "blocks": blocks.shape, "k": k})
    id_dtype = np.uint16 if teacher.config.vocab_size <= 1 << 16 else np.int32
    pieces: dict[str, list[np.ndarray]] = {field: [] for field in TARGET_FIELDS}
    starts = range(0, len(blocks), chunk_blocks)
    for chunk, start in enumerate(tqdm(starts, desc="teacher targets", unit="chunk", disable=not progress)):
        paths = {field: folder / f"{field}.{chunk}.npy" for field in TARGET_FIELDS}
        stored = {field: _checked_load(path, _read_digest(path)) for field, path in paths.items()}
        loaded = {field: array for field, array in stored.items() if array is not None}
        if len(loaded) < len(TARGET_FIELDS):
            inputs = jnp.asarray(blocks[start:start + chunk_blocks, :-1])
            computed = _block_targets(teacher.hidden_fn, teacher.params, teacher.phi, inputs, k)
            loaded = dict(zip(TARGET_FIELDS, (np.asarray(a) for a in computed)))
            loaded["ids"] = loaded["ids"].astype(id_dtype)
            for field, path in paths.items():
                storage.save_npy(path, loaded[field])
                storage.write_text(path.with_suffix(".sha"), storage.content_hash(path.read_bytes()))
        for field in TARGET_FIELDS:
            pieces[field].append(loaded[field])
    return {field: np.concatenate(values) for field, values in pieces.items()}


def read_targets(folder: Path) -> dict[str, np.ndarray]:
    """The targets :func:`build_targets` wrote in ``folder`` (its key folder), every chunk checked against its
    checksum; a missing or damaged chunk is one clear error (re-run the teacher-targets stage to rebuild it)."""
    folder = Path(folder)
    pieces: dict[str, list[np.ndarray]] = {field: [] for field in TARGET_FIELDS}
    chunk = 0
    while (folder / f"ids.{chunk}.npy").exists():
        for field in TARGET_FIELDS:
            path = folder / f"{field}.{chunk}.npy"
            array = _checked_load(path, _read_digest(path))
            if array is None:
                raise SentcompError(f"The teacher target chunk {path} is missing or damaged: re-run the "
                                    "teacher-targets stage (it recomputes only what is missing).")
            pieces[field].append(array)
        chunk += 1
    if not chunk:
        raise SentcompError(f"No teacher targets in {folder}: run the teacher-targets stage first.")
    return {field: np.concatenate(values) for field, values in pieces.items()}


def _read_digest(path: Path) -> str | None:
    sha = path.with_suffix(".sha")
    return sha.read_text().strip() if sha.exists() else None


def teacher_hidden(teacher: LanguageModel, blocks: np.ndarray, batch_blocks: int = 8) -> np.ndarray:
    """``f_T(s)`` at every input position of ``blocks [n, T+1]``: float32 ``[n, T, d_T]``."""
    hidden = jax.jit(teacher.hidden_fn)
    out = []
    for start in range(0, len(blocks), batch_blocks):
        inputs = jnp.asarray(blocks[start:start + batch_blocks, :-1])
        out.append(np.asarray(hidden(teacher.params, inputs, jnp.ones_like(inputs)), np.float32))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------- ε and the bound, exactly


def heldout_divergences(student_hidden: np.ndarray, student_phi, teacher_h: np.ndarray, teacher_phi,
                        chunk_size: int = DEFAULT_VOCAB_CHUNK) -> dict[str, np.ndarray]:
    """Per position ``kl = KL(p_T ‖ p_f)`` and ``quad_excess = ½‖Φᵀ(f − f*)‖²`` (``f* = G⁻¹Φp_T``, the student's Φ),
    exact (streamed over V) from the student's and the teacher's features at the same positions ``[..., d]``."""
    kl, target_mean = kernels.kl_from_features(teacher_h, teacher_phi, student_hidden, student_phi, chunk_size)
    return {"kl": np.asarray(kl),
            "quad_excess": np.asarray(kernels.quad_excess(student_hidden, student_phi, target_mean))}


def per_block_estimate(values: np.ndarray) -> dict[str, float]:
    """Mean over blocks of the per-block mean of ``values [n_blocks, T]`` with a 95% Student-t interval over blocks
    (positions of one block are not independent; blocks are treated as i.i.d.)."""
    return theory.mean_confidence_interval(np.asarray(values, np.float64).mean(axis=1)).as_dict()


def next_word_distribution(h: np.ndarray, phi) -> np.ndarray:
    """``p = softmax(Φᵀh)`` float64 ``[N, V]`` (dense: for the few hundred task contexts only)."""
    logits = np.asarray(h, np.float64) @ np.asarray(phi, np.float64).T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def task_frontier(teacher_h: np.ndarray, teacher_phi, labels: np.ndarray, max_norms: Sequence[float],
                  num_words: int = 0) -> dict[str, np.ndarray]:
    """The task's naturalness w.r.t. ``p* = p_T``: ``τ(B) = min_{‖v‖_∞ ≤ B} E ℓ(vᵀp_T, y)`` on the task's contexts
    (:func:`sentcomp.theory.naturalness_frontier`): ``{"max_norm" [k], "tau" [k], "word_weights" [k, V]}``.

    ``num_words > 0`` restricts ``v`` to the ``num_words`` words of largest mean ``p_T`` over the contexts (``v_w
    = 0`` elsewhere, so ``vᵀp_T`` is exact): every ``(τ, B)`` pair is still a valid naturalness pair and the bound
    stays exact; the frontier can only be looser than the whole-vocabulary one. The solver's cost grows with the
    number of words (L-BFGS-B over V = 49,152 bounded variables takes hours on a busy CPU)."""
    p_teacher = next_word_distribution(teacher_h, teacher_phi)
    words = (np.sort(np.argsort(-p_teacher.mean(axis=0))[:num_words]) if 0 < num_words < p_teacher.shape[1]
             else np.arange(p_teacher.shape[1]))
    frontier = theory.naturalness_frontier(p_teacher[:, words], labels, max_norms)
    word_weights = np.zeros((len(frontier.max_norm), p_teacher.shape[1]))
    word_weights[:, words] = frontier.word_weights
    return {"max_norm": frontier.max_norm, "tau": frontier.train_loss, "word_weights": word_weights,
            "words": words}


def plug_in_scores(h: np.ndarray, phi, word_weights: np.ndarray) -> np.ndarray:
    """``v_kᵀp(s)`` for every context and frontier point, ``p = softmax(Φᵀh)``, streamed over V: ``[N, k]``."""
    return np.asarray(kernels.expected_values(h, phi, np.asarray(word_weights, np.float32).T), np.float64)


def bound_check(student_h: np.ndarray, student_phi, teacher_h: np.ndarray, teacher_phi, labels: np.ndarray,
                frontier: dict[str, np.ndarray], tolerance: float = 1e-5) -> dict[str, Any]:
    """The theorem on the task's own contexts (γ = 1): per frontier point ``k``, ``τ_k`` (the teacher's loss
    ``E ℓ(v_kᵀp_T, y)`` recomputed here with the same float32 kernel as the student's), the student's plug-in
    loss ``E ℓ(v_kᵀp_f, y)`` and the bound ``τ_k + sqrt(2B_k²ε_T)``, ``ε_T`` = mean ``KL(p_T ‖ p_f)`` over the
    contexts. ``holds``: plug-in ≤ bound (+ ``tolerance`` for float32 rounding) at every point: an exact
    inequality (module docstring), so ``False`` is a bug, not a finding."""
    kl = np.asarray(kernels.kl_from_features(teacher_h, teacher_phi, student_h, student_phi)[0], np.float64)
    epsilon = float(np.maximum(kl, 0.0).mean())
    tau = np.array([theory.logistic_loss(s, labels) for s in plug_in_scores(teacher_h, teacher_phi,
                                                                             frontier["word_weights"]).T])
    plug_in = np.array([theory.logistic_loss(s, labels) for s in plug_in_scores(student_h, student_phi,
                                                                                 frontier["word_weights"]).T])
    bounds = theory.bound(tau, frontier["max_norm"], epsilon, 1.0)
    best = int(np.argmin(bounds))
    return {"epsilon_task": epsilon, "epsilon_task_ci": theory.mean_confidence_interval(kl).as_dict(),
            "tau": tau.tolist(), "max_norm": np.asarray(frontier["max_norm"]).tolist(), "plug_in": plug_in.tolist(),
            "bound": bounds.tolist(), "tightest": {"index": best, "tau": float(tau[best]),
                                                   "max_norm": float(frontier["max_norm"][best]),
                                                   "bound": float(bounds[best]), "plug_in": float(plug_in[best])},
            "holds": bool(np.all(plug_in <= bounds + tolerance)),
            "max_violation": float(np.max(plug_in - bounds))}


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` (numeric: no pickled objects) as one ``.npz`` written atomically (a temporary file renamed into
    place)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, allow_pickle=False, **arrays)
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
