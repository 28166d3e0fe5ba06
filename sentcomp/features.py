"""Feature extraction from any :class:`~sentcomp.models.LanguageModel`: one call, a list of texts, a dict of arrays.

``extract_features(lm, texts, kinds, words=..., prompt=..., cache_dir=...)`` returns, for each text ``s``
(notation of ../shared/PAPER.md, ``h = f(s)``, ``Φ`` the output embeddings):

=================  ===========  ===========================================================================
kind               shape        value
=================  ===========  ===========================================================================
``f``              ``[N, d]``   ``f(s)``: the model's features at the last non-pad token
``phi_p_f``        ``[N, d]``   conditional mean ``Φ p_f(s) = Σ_w softmax(Φᵀh)_w φ_w`` (streamed over V)
``log_z``          ``[N]``      ``log Z(f(s)) = log Σ_w exp(hᵀφ_w)``
``word_logits``    ``[N, k]``   ``hᵀφ_w`` for the k single-token forms of ``words`` (the authors' features)
``word_log_probs`` ``[N, k]``   ``log p_f(s)(w)``
``word_probs``     ``[N, k]``   ``p_f(s)(w)``
``p_f``            ``[N, V]``   the full next-word distribution, written to ``cache_dir`` chunk by chunk and
                                returned as a read-only ``np.memmap`` (never held whole in memory)
=================  ===========  ===========================================================================

plus ``result["metadata"]`` (a dict: model, prompt, truncation, word set, token counts, cache location).
No V-wide buffer larger than one batch ``[batch, V]`` ever exists (``p_f`` only); the other kinds use the
streamed kernels of :mod:`sentcomp.kernels`.

**Prompt** (the paper's sentence-completion view): ``text + prompt``, with the prompt's trailing whitespace
stripped by default (the authors' tokenizer did that, so ``f(s)`` is read at ``" is"`` of
``" This movie is "``); ``keep_prompt_trailing_space=True`` keeps it. Text and prompt are tokenized separately
and concatenated. **Truncation** to ``max_length`` tokens: ``"start"`` (default) drops the *beginning* of the
document so the prompt always survives; ``"end"`` is the authors' behaviour (cut the end, prompt included).

**Batches** are sorted by length and padded (right, masked) to a few length buckets (:func:`length_buckets`) with a fixed batch size,
so the jitted forward compiles once per bucket; they are split over every device of ``mesh`` (data parallel,
params replicated). Results do not depend on batch size or device count. With several processes (multi-host),
every process runs the same call on the same texts, feeds its own rows (:func:`sentcomp.parallel.global_batch`)
and receives all results; cache files are written identically by each (atomic renames, so a shared
filesystem stays consistent).

**Cache and resume**: with ``cache_dir``, results live in ``cache_dir/<key>/`` where the key hashes the model
(name, config, parameter values), the tokenizer's definition, prompt, truncation, max length, compute dtype,
chunk size and the texts. Each chunk of ``chunk_size`` texts is written as ``<kind>.<chunk>.npy`` (word kinds
are suffixed with a hash of their word ids) as soon as it is done, so an interrupted run resumes where it
stopped and a later call asking for more kinds only computes the missing ones. ``manifest.json`` records what
the key means.

Only ``lm.tokenizer``, ``lm.hidden_fn``, ``lm.phi_fn``, ``lm.params``, ``lm.name``, ``lm.config`` and
``lm.max_length`` are used, so any model family works.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sentcomp import kernels, parallel
from sentcomp.errors import SentcompError
from sentcomp.kernels.features import DEFAULT_VOCAB_CHUNK
from sentcomp.models.base import COMPUTE_DTYPES, LanguageModel, cast_floats
from sentcomp.models.tokenizers import tokenizer_fingerprint

KINDS = ("f", "phi_p_f", "log_z", "word_logits", "word_log_probs", "word_probs", "p_f")
WORD_KINDS = ("word_logits", "word_log_probs", "word_probs")
TRUNCATIONS = ("start", "end")


# ------------------------------------------------------------------------------------------------ word sets


@dataclasses.dataclass(frozen=True)
class WordSet:
    """The single-token forms of a word list.

    Attributes:
      words: the words asked for.
      token_ids: the kept token ids, in order (``" w"`` before ``"w"``, word by word).
      forms: the string of each kept token (``" great"`` or ``"great"``).
      source_words: which asked-for word each kept token comes from.
      dropped: the words with no single-token form.
    """

    words: tuple[str, ...]
    token_ids: tuple[int, ...]
    forms: tuple[str, ...]
    source_words: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def word_set(tokenizer, words: Sequence[str]) -> WordSet:
    """Resolves ``words`` to token ids with the paper's rule.

    Each word is tried in its ``" w"`` and ``"w"`` forms; a form is kept when the tokenizer makes it a single
    token, and a token id already kept (a repeated word, or two forms sharing a token) is not added twice.
    """
    if isinstance(words, str):
        raise SentcompError(f"words must be a list of words, not the string {words!r}.")
    ids: list[int] = []
    forms: list[str] = []
    sources: list[str] = []
    dropped: list[str] = []
    for word in words:
        kept_any = False
        for form in (" " + word, word):
            encoded = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                kept_any = True
                if encoded[0] not in ids:
                    ids.append(encoded[0])
                    forms.append(form)
                    sources.append(word)
        if not kept_any:
            dropped.append(word)
    return WordSet(tuple(words), tuple(ids), tuple(forms), tuple(sources), tuple(dropped))


# ----------------------------------------------------------------------------------------------- tokenizing


@dataclasses.dataclass(frozen=True)
class Encoding:
    """Token ids of every text (prompt appended, truncated) and how many texts were truncated."""

    token_ids: list[np.ndarray]
    n_truncated: int
    prompt: str | None


def effective_prompt(prompt: str | None, keep_prompt_trailing_space: bool = False) -> str | None:
    """The prompt as appended: trailing whitespace stripped (the paper's tokenizer did) unless kept."""
    if prompt is None or keep_prompt_trailing_space:
        return prompt
    return prompt.rstrip()


def encode_texts(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    prompt: str | None = None,
    keep_prompt_trailing_space: bool = False,
    truncation: str = "start",
) -> Encoding:
    """Token ids of ``special prefix + text + prompt`` for every text, at most ``max_length`` tokens each.

    The special prefix is what the tokenizer adds to an empty string (e.g. a BOS token; nothing for GPT-2).
    ``truncation="start"`` drops the oldest text tokens and keeps the prefix and the prompt;
    ``truncation="end"`` keeps the first ``max_length`` tokens (the authors' behaviour: the prompt may be lost).
    """
    if truncation not in TRUNCATIONS:
        raise SentcompError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}.")
    prompt = effective_prompt(prompt, keep_prompt_trailing_space)
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    room = max_length - len(prefix) - len(prompt_ids)
    if room < 1:
        raise SentcompError(f"The prompt {prompt!r} takes {len(prompt_ids)} tokens: no room left for text within "
                            f"max_length={max_length}.")
    text_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    encoded, n_truncated, empty = [], 0, []
    for i, ids in enumerate(text_ids):
        full = prefix + list(ids) + prompt_ids
        if not full:
            empty.append(i)
        if len(full) > max_length:
            n_truncated += 1
            full = full[:max_length] if truncation == "end" else prefix + list(ids)[len(ids) - room:] + prompt_ids
        encoded.append(np.asarray(full, np.int32))
    if empty:
        raise SentcompError(f"Texts at positions {empty[:10]} are empty (no tokens) and there is no prompt: features "
                            "need at least one token; drop them or pass a prompt.")
    return Encoding(encoded, n_truncated, prompt)


# ------------------------------------------------------------------------------------------------- batching


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded lengths ``smallest·{1, 1.5, 2, 3, 4, 6, ...}`` below ``max_length``, then ``max_length`` itself.

    Consecutive buckets differ by ≤ 1.5×, so padding wastes at most a third of a batch while a 512-token
    context needs only 11 compilations.
    """
    buckets, length = [], smallest
    while length < max_length:
        buckets += [b for b in (length, length * 3 // 2) if b < max_length]
        length *= 2
    return (*buckets, max_length)


@dataclasses.dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # positions (within the chunk) of the real rows
    token_ids: np.ndarray  # [batch_size, bucket], right-padded
    mask: np.ndarray  # [batch_size, bucket] int32; padding rows hold one dummy token so no row is empty
    n_tokens: int


def make_batches(token_ids: Sequence[np.ndarray], batch_size: int, buckets: Sequence[int], pad_id: int) -> list[Batch]:
    """Groups sequences by length (longest first) into fixed-size batches padded to the smallest fitting bucket."""
    lengths = np.array([len(ids) for ids in token_ids])
    order = np.argsort(-lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        longest = lengths[rows].max()
        fitting = [b for b in buckets if b >= longest]
        if not fitting:
            raise SentcompError(f"A sequence of {longest} tokens exceeds the largest bucket {max(buckets)}.")
        ids = np.full((batch_size, fitting[0]), pad_id, np.int32)
        mask = np.zeros((batch_size, fitting[0]), np.int32)
        mask[len(rows):, 0] = 1
        for row, index in enumerate(rows):
            ids[row, : lengths[index]] = token_ids[index]
            mask[row, : lengths[index]] = 1
        batches.append(Batch(rows, ids, mask, int(lengths[rows].sum())))
    return batches


# ------------------------------------------------------------------------------------------- the computation


@functools.lru_cache(maxsize=32)
def _batch_fn(hidden_fn, phi_fn, kinds: tuple[str, ...], vocab_chunk: int, mesh: jax.sharding.Mesh):
    """The jitted ``(params, ids, mask, word_ids) -> {kind: [B, ...]}``, batch split over ``mesh``."""

    def compute(params, token_ids, mask, word_ids):
        hidden = hidden_fn(params, token_ids, mask)
        last = jnp.sum(mask, axis=1) - 1
        f = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        phi = phi_fn(params).astype(jnp.float32)  # the V-wide kernels compute in float32 whatever the model ran in
        compute_kind = {
            "f": lambda: f,
            "phi_p_f": lambda: kernels.conditional_mean_features(f, phi, vocab_chunk),
            "log_z": lambda: kernels.log_partition(f, phi, vocab_chunk),
            "word_logits": lambda: kernels.word_logits(f, phi, word_ids),
            "word_log_probs": lambda: kernels.word_log_probs(f, phi, word_ids, vocab_chunk),
            "word_probs": lambda: kernels.word_probs(f, phi, word_ids, vocab_chunk),
            "p_f": lambda: jax.nn.softmax(jnp.dot(f, phi.T, preferred_element_type=jnp.float32), axis=-1),
        }
        return {kind: compute_kind[kind]() for kind in kinds}

    batch, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.jit(compute, in_shardings=(whole, batch, batch, whole), out_shardings=batch)


def _compute_chunk(fn, params, word_ids, token_ids, batch_size, buckets, pad_id, mesh, on_batch):
    """All kinds for one chunk of sequences, in their original order: ``{kind: [n, ...]}``.

    ``on_batch(indices, outputs, n_tokens)`` is called after every batch (for ``p_f`` rows and progress).
    """
    outputs: dict[str, np.ndarray] = {}
    host_rows = parallel.host_row_indices(batch_size, mesh)  # all rows with one process
    for batch in make_batches(token_ids, batch_size, buckets, pad_id):
        ids, mask = parallel.global_batch((batch.token_ids[host_rows], batch.mask[host_rows]), mesh)
        result = parallel.fetch(fn(params, ids, mask, word_ids))
        real = {kind: value[: len(batch.indices)] for kind, value in result.items()}
        on_batch(batch.indices, real, batch.n_tokens)
        for kind, value in real.items():
            if kind not in outputs:
                outputs[kind] = np.empty((len(token_ids), *value.shape[1:]), value.dtype)
            outputs[kind][batch.indices] = value
    return outputs


# ------------------------------------------------------------------------------------------------- caching


def _hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:20]


def model_fingerprint(lm: LanguageModel) -> str:
    """A hash of the model's name, family, config and every parameter value (so retrained weights miss)."""
    digest = hashlib.sha256(json.dumps([lm.name, lm.family, repr(lm.config)]).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(lm.params)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(jax.tree_util.keystr(path).encode() + str(array.dtype).encode() + array.tobytes())
    return digest.hexdigest()[:20]


def texts_fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:20]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Writes atomically (temp file + rename) so an interruption never leaves a truncated chunk."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        np.save(tmp, array)
    os.replace(tmp.name, path)


class _ChunkStore:
    """Per-chunk ``.npy`` files of every kind under one key directory (or in memory when no directory)."""

    def __init__(self, directory: Path | None, manifest: dict[str, Any]):
        self.directory = directory
        self.memory: dict[str, np.ndarray] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            if not (directory / "manifest.json").is_file():
                (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))

    def _path(self, name: str, chunk: int) -> Path:
        return self.directory / f"{name}.{chunk:05d}.npy"

    def has(self, name: str, chunk: int) -> bool:
        return self.directory is not None and self._path(name, chunk).is_file()

    def put(self, name: str, chunk: int, array: np.ndarray) -> None:
        if self.directory is None:
            self.memory[f"{name}.{chunk}"] = array
        else:
            _save_npy(self._path(name, chunk), array)

    def get(self, name: str, chunk: int) -> np.ndarray:
        if self.directory is None:
            return self.memory[f"{name}.{chunk}"]
        return np.load(self._path(name, chunk))


def _stored_name(kind: str, words: WordSet | None) -> str:
    """File stem of a kind; word kinds depend on the word ids, so their hash is part of the name."""
    return f"{kind}-{_hash(list(words.token_ids))[:10]}" if kind in WORD_KINDS else kind


# ------------------------------------------------------------------------------------------------ extraction


def _check_kinds(kinds: Sequence[str], words) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise SentcompError(f"Unknown feature kinds {unknown or '(none given)'}; choose from {KINDS}.")
    if any(k in WORD_KINDS for k in kinds) and not words:
        raise SentcompError(f"Kinds {[k for k in kinds if k in WORD_KINDS]} need a word list: pass words=[...].")
    return tuple(dict.fromkeys(kinds))


def extract_features(
    lm: LanguageModel,
    texts: Sequence[str],
    kinds: Sequence[str] = ("f",),
    *,
    words: Sequence[str] | None = None,
    prompt: str | None = None,
    keep_prompt_trailing_space: bool = False,
    truncation: str = "start",
    max_length: int | None = None,
    batch_size: int = 16,
    buckets: Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    chunk_size: int = 1024,
    mesh: jax.sharding.Mesh | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    compute_dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Features of every text; see the module docstring for kinds, prompt, truncation, caching.

    Args:
      lm: any LanguageModel.
      texts: the documents ``s``.
      kinds: which features (see ``KINDS``).
      words: word list for the word kinds (resolved with :func:`word_set`).
      prompt: appended to every text, e.g. ``" This movie is "``.
      keep_prompt_trailing_space: keep the prompt's trailing whitespace (default strips it, as the paper).
      truncation: ``"start"`` (drop the beginning of long documents, keep the prompt) or ``"end"`` (the paper's).
      max_length: token limit (default ``lm.max_length``; the paper used 512).
      batch_size: sequences per forward pass (rounded up to a multiple of the device count).
      buckets: padded lengths (default :func:`length_buckets`).
      cache_dir: where results are cached and resumed from (needed for ``p_f``).
      chunk_size: texts per cached chunk.
      mesh: device mesh (default: every device, :func:`sentcomp.parallel.data_mesh`).
      vocab_chunk: vocabulary chunk of the streamed kernels.
      compute_dtype: ``"float32"`` or ``"bfloat16"``: the dtype the model's parameters (Φ included) are cast
        to and its forward pass runs in (bf16 halves parameter memory and is the fast path on TPUs and recent
        GPUs; f(s) differs from float32's by ~1% relative). The kernels after it compute in float32 from f(s)
        and Φ's values. Part of the cache key.
      progress: show a tqdm bar (tokens/s).

    Returns:
      ``{kind: np.ndarray}`` for each requested kind, and ``"metadata"``: a dict.
    """
    kinds = _check_kinds(kinds, words)
    if compute_dtype not in COMPUTE_DTYPES:
        raise SentcompError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}.")
    if "p_f" in kinds and cache_dir is None:
        raise SentcompError("kind 'p_f' is written to disk chunk by chunk (N×V floats): pass cache_dir=...")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise SentcompError("texts must be a list of strings.")
    max_length = min(max_length or lm.max_length, lm.max_length)
    mesh = mesh if mesh is not None else parallel.data_mesh()
    batch_size = parallel.pad_to_multiple(max(1, batch_size), mesh.size)
    buckets = tuple(sorted(b for b in (buckets or length_buckets(max_length)) if b <= max_length)) or (max_length,)
    if buckets[-1] < max_length:
        buckets = (*buckets, max_length)

    tokenizer = lm.tokenizer
    words_resolved = word_set(tokenizer, words) if words else None
    encoding = encode_texts(tokenizer, texts, max_length, prompt, keep_prompt_trailing_space, truncation)
    manifest = {
        "model": lm.name,
        "model_fingerprint": model_fingerprint(lm) if cache_dir is not None else None,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "prompt": encoding.prompt,
        "truncation": truncation,
        "max_length": max_length,
        "compute_dtype": compute_dtype,
        "chunk_size": chunk_size,
        "n_texts": len(texts),
        "texts_fingerprint": texts_fingerprint(texts),
    }
    key_dir = Path(cache_dir) / _hash(manifest) if cache_dir is not None else None
    store = _ChunkStore(key_dir, manifest)

    vocab_size = int(lm.phi.shape[0])
    p_f_file = None
    if "p_f" in kinds:
        p_f_path = key_dir / "p_f.npy"
        mode = "r+" if p_f_path.is_file() else "w+"
        p_f_file = np.lib.format.open_memmap(p_f_path, mode=mode, dtype=np.float32, shape=(len(texts), vocab_size))

    n_chunks = -(-len(texts) // chunk_size)
    stored = {kind: _stored_name(kind, words_resolved) for kind in kinds}
    todo = [c for c in range(n_chunks) if not all(store.has(stored[k], c) for k in kinds)]
    lengths = np.array([len(ids) for ids in encoding.token_ids])
    chunk_tokens = [int(lengths[c * chunk_size:(c + 1) * chunk_size].sum()) for c in range(n_chunks)]
    bar = tqdm(total=int(lengths.sum()), initial=sum(chunk_tokens) - sum(chunk_tokens[c] for c in todo),
               unit="tok", unit_scale=True, desc=f"features {lm.name}", disable=not progress)

    if todo:
        params = parallel.replicate(cast_floats(lm.params, COMPUTE_DTYPES[compute_dtype]), mesh)
        word_ids = parallel.replicate(jnp.asarray(words_resolved.token_ids if words_resolved else [0], jnp.int32), mesh)
        pad_id = _pad_id(tokenizer)
    for chunk in todo:
        start = chunk * chunk_size
        missing = tuple(k for k in kinds if not store.has(stored[k], chunk))
        fn = _batch_fn(lm.hidden_fn, lm.phi_fn, missing, vocab_chunk, mesh)

        def on_batch(indices, outputs, n_tokens):
            if "p_f" in outputs:
                p_f_file[start + indices] = outputs.pop("p_f")
            bar.update(n_tokens)

        outputs = _compute_chunk(fn, params, word_ids, encoding.token_ids[start:start + chunk_size], batch_size,
                                 buckets, pad_id, mesh, on_batch)
        if p_f_file is not None and "p_f" in missing:
            p_f_file.flush()
            store.put("p_f", chunk, np.zeros(0, np.int8))  # marker: this chunk's rows of p_f.npy are written
        for kind, value in outputs.items():
            store.put(stored[kind], chunk, value)
    bar.close()

    result: dict[str, Any] = {
        kind: np.concatenate([store.get(stored[kind], c) for c in range(n_chunks)]) if n_chunks else np.zeros(0)
        for kind in kinds if kind != "p_f"
    }
    if p_f_file is not None:
        del p_f_file
        result["p_f"] = np.load(key_dir / "p_f.npy", mmap_mode="r")
    result["metadata"] = {
        **manifest,
        "kinds": list(kinds),
        "words": words_resolved.to_json() if words_resolved else None,
        "n_tokens": int(lengths.sum()),
        "n_truncated": encoding.n_truncated,
        "cache_dir": str(key_dir) if key_dir is not None else None,
        "computed_chunks": todo,
    }
    return result


def _pad_id(tokenizer) -> int:
    """Any valid id works (padding is masked); prefer the tokenizer's pad, then EOS, then 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
