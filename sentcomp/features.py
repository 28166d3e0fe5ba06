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
``projected_p_f``  ``[N, d']``  ``A p_f(s) = Σ_w p_f(s)(w) a_w`` for a seeded random orthonormal ``d' × V``
                                matrix ``A`` (columns ``a_w``; :func:`random_projection`, ``d' = d`` by
                                default), streamed over V like ``phi_p_f``
``p_f``            ``[N, V]``   the full next-word distribution, written to ``cache_dir`` chunk by chunk and
                                returned as a read-only ``np.memmap`` (never held whole in memory)
=================  ===========  ===========================================================================

plus ``result["metadata"]`` (a dict: model, prompt, truncation, word set, token counts, cache location).
No V-wide buffer larger than one batch ``[batch, V]`` ever exists (``p_f`` only); the other kinds use the
streamed kernels of :mod:`sentcomp.kernels`.

**Prompt, truncation, word sets and batches** follow :mod:`sentcomp.data.text`: ``text + prompt``, with the
prompt's trailing whitespace stripped by default (``keep_prompt_trailing_space=True`` keeps it); truncation
``"start"`` (default) drops the *beginning* of a long document so the prompt always survives, ``"end"`` is the
authors' behaviour. Batches are sorted by length and padded (right, masked) to a few length buckets with a fixed
batch size, so the jitted forward compiles once per bucket; they are split over every device of ``mesh`` (data
parallel, params replicated) by :func:`sentcomp.parallel.apply_to_batch`. Results do not depend on batch size
or device count. With several processes (multi-host), every process runs the same call on the same texts,
feeds its own rows and receives all results; process 0 alone reads and writes the cache and decides which
chunks are missing, and sends what it read to the others (:func:`sentcomp.parallel.main_decides`), so the hosts
need no shared filesystem and cannot disagree about what is done.

**Cache and resume**: with ``cache_dir``, results live in ``cache_dir/<key>/`` where the key hashes the model
(name, config, parameter values), the code that computes them (:func:`computation_fingerprint`: after a model
or kernel fix old features are not served), the tokenizer's definition, prompt, truncation, max length, compute dtype,
chunk size and the texts. Each chunk of ``chunk_size`` texts is written as ``<kind>.<chunk>.npy`` (word kinds
are suffixed with a hash of their word ids) as soon as it is done, so an interrupted run resumes where it
stopped and a later call asking for more kinds only computes the missing ones. Each chunk has a checksum file
beside it; a chunk whose bytes do not match (truncated, empty, overwritten) is recomputed, never used.
``manifest.json`` records what the key means.

Only ``lm.tokenizer``, ``lm.hidden_fn``, ``lm.phi_fn``, ``lm.params``, ``lm.name``, ``lm.config`` and
``lm.max_length`` are used, so any model family works.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sentcomp import kernels, parallel
from sentcomp.data import text
from sentcomp.data.text import (
    WordSet,
    batch_maxima,
    bucket_lengths,
    encode_texts,
    fitted_buckets,
    make_batches,
    tokenizer_fingerprint,
    word_set,
)
from sentcomp.errors import SentcompError, replace_settings
from sentcomp.models.base import COMPUTE_DTYPES, LanguageModel, cast_floats
from sentcomp.results import storage

KINDS = ("f", "phi_p_f", "log_z", "word_logits", "word_log_probs", "word_probs", "p_f", "projected_p_f")
WORD_KINDS = ("word_logits", "word_log_probs", "word_probs")


# ------------------------------------------------------------------------------------------- the computation


def last_token_features(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """``f(s)``: each row's state at its last non-pad position, ``[B, d]`` from ``[B, T, d]`` (right padding)."""
    last = jnp.sum(mask, axis=1) - 1
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def kind_values(f: jax.Array, phi: jax.Array, kinds: tuple[str, ...], word_ids: jax.Array, projection: jax.Array,
                vocab_chunk: int) -> dict[str, jax.Array]:
    """Each of ``kinds`` (module docstring) from the features ``f [B, d]`` and ``Φ [V, d]`` (both float32), the word
    ids ``[k]`` of the word kinds and the projection ``[V, d']`` of ``projected_p_f``."""
    compute_kind = {
        "f": lambda: f,
        "phi_p_f": lambda: kernels.conditional_mean_features(f, phi, vocab_chunk),
        "log_z": lambda: kernels.log_partition(f, phi, vocab_chunk),
        "word_logits": lambda: kernels.word_logits(f, phi, word_ids),
        "word_log_probs": lambda: kernels.word_log_probs(f, phi, word_ids, vocab_chunk),
        "word_probs": lambda: kernels.word_probs(f, phi, word_ids, vocab_chunk),
        "p_f": lambda: jax.nn.softmax(jnp.dot(f, phi.T, preferred_element_type=jnp.float32,
                                              precision=kernels.DEFAULT_PRECISION), axis=-1),
        "projected_p_f": lambda: kernels.expected_values(f, phi, projection, vocab_chunk),
    }
    return {kind: compute_kind[kind]() for kind in kinds}


@functools.lru_cache(maxsize=32)
def _batch_fn(hidden_fn, phi_fn, kinds: tuple[str, ...], vocab_chunk: int, mesh: jax.sharding.Mesh):
    """The jitted ``(params, tables, ids, mask) -> {kind: [B, ...]}``, batch split over ``mesh``; ``tables``
    holds the replicated ``word_ids [k]`` and ``projection [V, d']`` (:func:`random_projection`)."""

    def compute(params, tables, token_ids, mask):
        f = last_token_features(hidden_fn(params, token_ids, mask), mask).astype(jnp.float32)
        phi = phi_fn(params).astype(jnp.float32)  # the V-wide kernels compute in float32 whatever the model ran in
        return kind_values(f, phi, kinds, tables["word_ids"], tables["projection"], vocab_chunk)

    batch, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.jit(compute, in_shardings=(whole, whole, batch, batch), out_shardings=batch)


def computation_fingerprint(lm: LanguageModel) -> str:
    """A hash of the code that turns texts into features for ``lm``: this module, the kernels, the text
    plumbing, the shared layers and the model's family module (part of the cache key)."""
    family_module = getattr(lm.hidden_fn, "func", lm.hidden_fn).__module__
    return storage.code_fingerprint(__name__, "sentcomp.kernels.softmax_features", "sentcomp.kernels.precision",
                                    text.__name__, "sentcomp.models.layers", family_module)


def _compute_chunk(fn, params, tables, token_ids, batch_size, buckets, pad_id, mesh, on_batch):
    """All kinds for one chunk of sequences, in their original order: ``{kind: [n, ...]}``.

    ``on_batch(indices, outputs, n_tokens)`` is called after every batch (for ``p_f`` rows and progress).
    """
    outputs: dict[str, np.ndarray] = {}
    for batch in make_batches(token_ids, batch_size, buckets, pad_id):
        result = parallel.apply_to_batch(fn, (batch.token_ids, batch.mask), mesh, params, tables)
        real = {kind: value[: len(batch.indices)] for kind, value in result.items()}
        on_batch(batch.indices, real, batch.n_tokens)
        _place(outputs, batch.indices, real, len(token_ids))
    return outputs


# ------------------------------------------------------------------------------------------------- caching


def _read_manifest(path: Path) -> Any:
    """A key directory's ``manifest.json`` as JSON, or None if it is missing or unreadable (e.g. the 0-byte file
    a full disk leaves); the manifest only describes the key, so a damaged one is simply written again."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _ChunkStore:
    """Per-chunk ``.npy`` files of every kind under one key directory (or in memory when no directory).

    Only process 0 writes the directory (manifest and chunks) and reads it; other processes receive what it
    read (:func:`sentcomp.parallel.main_decides`), so hosts need no shared filesystem and never disagree.
    """

    def __init__(self, directory: Path | None, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest
        self.memory: dict[str, np.ndarray] = {}
        if directory is not None and parallel.is_main_process():
            directory.mkdir(parents=True, exist_ok=True)
            if _read_manifest(directory / "manifest.json") != json.loads(json.dumps(manifest)):
                storage.write_json(directory / "manifest.json", manifest)  # missing, empty or damaged: rewritten

    def has(self, name: str, chunk: int) -> bool:
        """Whether the chunk is stored *intact* and usable: its file's bytes hash to the checksum written beside it,
        and it holds no NaN/inf. A truncated, empty or overwritten chunk counts as missing and is recomputed; so
        does one holding NaN/inf (with a warning naming its file: a numerical failure of the run that wrote it)."""
        if self.directory is None:
            return False
        path = _chunk_path(self.directory, name, chunk)
        checksum = path.with_suffix(".sha256")
        if not (path.is_file() and checksum.is_file()):
            return False
        data = path.read_bytes()
        if storage.content_hash(data) != checksum.read_text().strip():
            return False
        if not np.isfinite(np.load(io.BytesIO(data))).all():
            warnings.warn(f"The cached feature chunk {path} holds NaN/inf values; it is recomputed.", stacklevel=2)
            return False
        return True

    def put(self, name: str, chunk: int, array: np.ndarray) -> None:
        if self.directory is None:
            self.memory[f"{name}.{chunk}"] = array
        elif parallel.is_main_process():
            path = _chunk_path(self.directory, name, chunk)
            storage.save_npy(path, array)
            storage.write_text(path.with_suffix(".sha256"), storage.content_hash(path.read_bytes()) + "\n")

    def get(self, name: str, chunk: int) -> np.ndarray:
        if self.directory is None:
            return self.memory[f"{name}.{chunk}"]
        return np.load(_chunk_path(self.directory, name, chunk))


def _chunk_path(directory: Path, name: str, chunk: int) -> Path:
    """Where a key directory stores one chunk of one stored kind (:class:`_ChunkStore`)."""
    return directory / f"{name}.{chunk:05d}.npy"


def _stored_name(kind: str, words: WordSet | None, projection: tuple[int, int]) -> str:
    """File stem of a kind; word kinds depend on the word ids, so their hash is part of the name, and the
    projected distribution on the projection's ``(dimension, seed)``."""
    if kind in WORD_KINDS:
        assert words is not None  # word kinds come with words: _check_kinds refuses them without
        return f"{kind}-{storage.content_hash(list(words.token_ids))[:10]}"
    return f"{kind}-{projection[0]}-seed{projection[1]}" if kind == "projected_p_f" else kind


def random_projection(vocab_size: int, dim: int, seed: int) -> np.ndarray:
    """``Aᵀ``, ``[V, dim]`` float32 with orthonormal columns (``A Aᵀ = I``): the paper's seeded random
    orthonormal ``d × V`` projection of ``p_f(s)``, the Q factor of a seeded Gaussian ``[V, dim]`` matrix (its
    column space is uniformly distributed; signs fixed so the result depends on the seed alone)."""
    if not 0 < dim <= vocab_size:
        raise SentcompError(f"A random projection of a {vocab_size}-word distribution needs 0 < dim ≤ {vocab_size}, "
                            f"got {dim}.")
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((vocab_size, dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _p_f_memmap(key_dir: Path, n_texts: int, vocab_size: int, chunk_size: int,
                missing: dict[int, tuple[str, ...]]) -> np.memmap:
    """The ``[N, V]`` float32 file ``p_f`` rows are written into: ``key_dir/p_f.npy`` on process 0 (the cache);
    on other processes a scratch file of their own, into which the rows process 0 has cached are copied
    (sent chunk by chunk), so every process returns the whole ``p_f``."""
    shape = (n_texts, vocab_size)
    if parallel.is_main_process():
        path = key_dir / "p_f.npy"
        return np.lib.format.open_memmap(path, mode="r+" if path.is_file() else "w+", dtype=np.float32, shape=shape)
    scratch = np.lib.format.open_memmap(Path(tempfile.mkdtemp(prefix="sentcomp-p_f-")) / "p_f.npy", mode="w+",
                                        dtype=np.float32, shape=shape)
    for chunk in (c for c, kinds in missing.items() if "p_f" not in kinds):
        rows = slice(chunk * chunk_size, (chunk + 1) * chunk_size)

        def cached_rows(rows: slice = rows) -> np.ndarray:
            return np.asarray(np.load(key_dir / "p_f.npy", mmap_mode="r")[rows])

        scratch[rows] = parallel.main_decides(cached_rows)
    return scratch


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


@dataclasses.dataclass(frozen=True)
class ExtractionOptions:
    """How :func:`extract_features` turns texts into features; what it extracts (kinds, words, prompt) is given per
    call. A program builds these once from its config and passes them to every extraction.

    Attributes:
      max_length: token limit (None: ``lm.max_length``, never more; the paper used 512).
      truncation: ``"start"`` (drop the beginning of long documents, keep the prompt) or ``"end"`` (the paper's).
      keep_prompt_trailing_space: keep the prompt's trailing whitespace (default strips it, as the paper).
      batch_size: sequences per forward pass (rounded up to a multiple of the device count).
      buckets: padded lengths (None: :func:`sentcomp.data.text.length_buckets`).
      compute_dtype: ``"float32"`` or ``"bfloat16"``: the dtype the model's parameters (Φ included) are cast to and
        its forward pass runs in (bf16 halves parameter memory and is the fast path on TPUs and recent GPUs; f(s)
        differs from float32's by ~1% relative). The kernels after it compute in float32 from f(s) and Φ's
        values. Part of the cache key.
      vocab_chunk: vocabulary chunk of the streamed kernels (None: the whole vocabulary when a batch's logits
        fit :data:`sentcomp.kernels.softmax_features.LOGITS_BUDGET_BYTES`, :func:`kernels.vocab_chunk_for`).
      projection_dim, projection_seed: shape and seed of ``projected_p_f``'s random orthonormal projection
        (:func:`random_projection`; None: the model's ``d``, as the paper).
      cache_dir: where results are cached and resumed from (needed for ``p_f``).
      chunk_size: texts per cached chunk.
      mesh: device mesh (None: every device, :func:`sentcomp.parallel.data_mesh`).
      progress: show a tqdm bar (tokens/s).
    """

    max_length: int | None = None
    truncation: str = "start"
    keep_prompt_trailing_space: bool = False
    batch_size: int = 16
    buckets: Sequence[int] | None = None
    compute_dtype: str = "float32"
    vocab_chunk: int | None = None
    projection_dim: int | None = None
    projection_seed: int = 0
    cache_dir: str | Path | None = None
    chunk_size: int = 1024
    mesh: jax.sharding.Mesh | None = None
    progress: bool = True

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise SentcompError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}.")

    def replace(self, **settings) -> ExtractionOptions:
        """These options with ``settings`` changed; an unknown name is one clear error listing the known ones."""
        return replace_settings(self, settings, "extraction option")

    def resolved(self, lm: LanguageModel) -> ExtractionOptions:
        """The defaults made concrete for ``lm``: its ``max_length`` (a larger one capped to it), every device's
        mesh, the batch size rounded up to a multiple of the mesh's devices, the length buckets, the vocabulary
        chunk."""
        max_length = min(self.max_length or lm.max_length, lm.max_length)
        mesh = self.mesh if self.mesh is not None else parallel.data_mesh()
        batch_size = parallel.pad_to_multiple(max(1, self.batch_size), mesh.size)
        return dataclasses.replace(self, max_length=max_length, mesh=mesh,
                                   buckets=bucket_lengths(max_length, self.buckets), batch_size=batch_size,
                                   vocab_chunk=self.vocab_chunk or kernels.vocab_chunk_for(batch_size,
                                                                                           int(lm.phi.shape[0])))


def _check_request(texts: Sequence[str], kinds: Sequence[str], words, options: ExtractionOptions) -> tuple[str, ...]:
    """The requested kinds, once each in order, after checking that they exist, that word kinds have words, that
    ``p_f`` has a cache directory and that ``texts`` is a list of strings."""
    kinds = _check_kinds(kinds, words)
    if "p_f" in kinds and options.cache_dir is None:
        raise SentcompError("kind 'p_f' is written to disk chunk by chunk (N×V floats): pass cache_dir=...")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise SentcompError("texts must be a list of strings.")
    return kinds


def cache_manifest(lm: LanguageModel, texts: Sequence[str], encoding: text.Encoding,
                   options: ExtractionOptions) -> dict[str, Any]:
    """What a cache key means (its hash names the key directory; ``manifest.json`` inside): the model, the code,
    the tokenizer, how texts were encoded, the compute dtype, the chunking and the texts. ``options`` resolved."""
    return {
        "model": lm.name,
        "model_fingerprint": lm.fingerprint if options.cache_dir is not None else None,
        "code_fingerprint": computation_fingerprint(lm),
        "tokenizer_fingerprint": tokenizer_fingerprint(lm.tokenizer),
        "prompt": encoding.prompt,
        "truncation": options.truncation,
        "max_length": options.max_length,
        "compute_dtype": options.compute_dtype,
        "chunk_size": options.chunk_size,
        "n_texts": len(texts),
        "texts_fingerprint": storage.texts_fingerprint(texts),
    }


@dataclasses.dataclass
class _Extraction:
    """One call's plan: the encoded texts, where each kind is stored, which chunks lack which kinds, and what the
    run computed (``fresh``, by stored name and chunk)."""

    lm: LanguageModel
    options: ExtractionOptions  # resolved
    encoding: text.Encoding
    words: WordSet | None
    store: _ChunkStore
    stored: dict[str, str]  # kind -> stored name
    projection: tuple[int, int]  # (dimension, seed)
    missing: dict[int, tuple[str, ...]]  # chunk -> the kinds it lacks
    texts: list[str] = dataclasses.field(default_factory=list)
    fresh: dict[tuple[str, int], np.ndarray] = dataclasses.field(default_factory=dict)
    shared_chunks: list[int] = dataclasses.field(default_factory=list)  # computed by compute_shared
    continued_rows: int = 0  # rows compute_shared continued from their text's key/value cache

    @property
    def n_chunks(self) -> int:
        return len(self.missing)

    @property
    def todo(self) -> list[int]:
        return [c for c in range(self.n_chunks) if self.missing[c]]

    def chunk_rows(self, chunk: int) -> slice:
        size = self.options.chunk_size
        return slice(chunk * size, (chunk + 1) * size)


def plan_extraction(lm: LanguageModel, texts: Sequence[str], kinds: tuple[str, ...], words, prompt: str | None,
                    options: ExtractionOptions) -> _Extraction:
    """Texts encoded (:func:`sentcomp.data.text.encode_texts`), the cache key's store opened, and which chunks
    lack which kinds decided by process 0 (:func:`sentcomp.parallel.main_decides`). ``options`` resolved
    (:meth:`ExtractionOptions.resolved`)."""
    if options.max_length is None or options.mesh is None:
        raise SentcompError("plan_extraction needs resolved extraction options (max_length and mesh set): pass "
                            "options.resolved(lm).")
    words = word_set(lm.tokenizer, words) if words else None
    encoding = encode_texts(lm.tokenizer, texts, options.max_length, prompt, options.keep_prompt_trailing_space,
                            options.truncation)
    manifest = cache_manifest(lm, texts, encoding, options)
    key_dir = Path(options.cache_dir) / storage.content_hash(manifest) if options.cache_dir is not None else None
    store = _ChunkStore(key_dir, manifest)
    n_chunks = -(-len(texts) // options.chunk_size)
    projection = (options.projection_dim or int(lm.phi.shape[1]), options.projection_seed)
    stored = {kind: _stored_name(kind, words, projection) for kind in kinds}
    missing = parallel.main_decides(lambda: {c: tuple(k for k in kinds if not store.has(stored[k], c))
                                             for c in range(n_chunks)})
    return _Extraction(lm, options, encoding, words, store, stored, projection, missing, list(texts))


def _replicated_inputs(plan: _Extraction, kinds: tuple[str, ...]):
    """``(params, tables)`` on every device: the parameters cast to the compute dtype, the word ids and the
    random projection (:func:`_batch_fn`; placeholders for kinds not requested)."""
    lm, options, words, mesh = plan.lm, plan.options, plan.words, plan.options.mesh
    assert mesh is not None  # plan_extraction refuses options that are not resolved (their mesh set)
    vocab_size = int(lm.phi.shape[0])
    params = parallel.replicate(cast_floats(lm.params, COMPUTE_DTYPES[options.compute_dtype]), mesh)
    tables = parallel.replicate({
        "word_ids": jnp.asarray(words.token_ids if words else [0], jnp.int32),
        "projection": (random_projection(vocab_size, *plan.projection) if "projected_p_f" in kinds
                       else jnp.zeros((vocab_size, 1), jnp.float32)),
    }, mesh)
    return params, tables


def compute_missing(plan: _Extraction, kinds: tuple[str, ...], p_f_file: np.memmap | None) -> None:
    """Each chunk's missing kinds (:func:`_compute_chunk`), stored as each chunk finishes and kept in
    ``plan.fresh``; ``p_f`` rows go straight into ``p_f_file``. A progress bar counts tokens."""
    lm, options, token_ids = plan.lm, plan.options, plan.encoding.token_ids
    lengths = np.array([len(ids) for ids in token_ids])
    done = sum(int(lengths[plan.chunk_rows(c)].sum()) for c in range(plan.n_chunks) if not plan.missing[c])
    bar = tqdm(total=int(lengths.sum()), initial=done, unit="tok", unit_scale=True, desc=f"features {lm.name}",
               disable=not options.progress)
    if plan.todo:
        params, tables = _replicated_inputs(plan, kinds)
        pad_id = text.pad_id(lm.tokenizer)
    for chunk in plan.todo:
        rows = plan.chunk_rows(chunk)
        fn = _batch_fn(lm.hidden_fn, lm.phi_fn, plan.missing[chunk], options.vocab_chunk, options.mesh)

        def on_batch(indices, outputs, n_tokens, start=rows.start):
            if "p_f" in outputs:
                assert p_f_file is not None  # p_f is computed only when requested, and extract_features then opens it
                p_f_file[start + indices] = outputs.pop("p_f")
            bar.update(n_tokens)

        outputs = _compute_chunk(fn, params, tables, token_ids[rows], options.batch_size, options.buckets, pad_id,
                                 options.mesh, on_batch)
        if p_f_file is not None and "p_f" in plan.missing[chunk]:
            p_f_file.flush()
            plan.store.put("p_f", chunk, np.zeros(0, np.int8))  # marker: this chunk's rows of p_f.npy are written
        for kind, value in outputs.items():
            plan.store.put(plan.stored[kind], chunk, value)
            plan.fresh[plan.stored[kind], chunk] = value
    bar.close()


def gather_features(plan: _Extraction, kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every kind but ``p_f`` for all texts, ``[N, ...]``: the chunks this call computed, and the cached ones
    (read by process 0 and sent to the others)."""
    n_chunks, stored, fresh = plan.n_chunks, plan.stored, plan.fresh
    wanted = [(stored[kind], c) for kind in kinds if kind != "p_f" for c in range(n_chunks)]
    cached = parallel.main_decides(lambda: {key: plan.store.get(*key) for key in wanted if key not in fresh})
    return {kind: np.concatenate([fresh.get((stored[kind], c), cached.get((stored[kind], c)))
                                  for c in range(n_chunks)]) if n_chunks else np.zeros(0)
            for kind in kinds if kind != "p_f"}


def extract_features(lm: LanguageModel, texts: Sequence[str], kinds: Sequence[str] = ("f",), *,
                     words: Sequence[str] | None = None, prompt: str | None = None,
                     options: ExtractionOptions | None = None, **settings) -> dict[str, Any]:
    """Features of every text; see the module docstring for kinds, prompt, truncation, caching.

    Args:
      lm: any LanguageModel.
      texts: the documents ``s``.
      kinds: which features (see ``KINDS``).
      words: word list for the word kinds (resolved with :func:`word_set`).
      prompt: appended to every text, e.g. ``" This movie is "``.
      options: how to extract (:class:`ExtractionOptions`; None: its defaults).
      **settings: fields of :class:`ExtractionOptions` to replace in ``options`` (``batch_size=8``,
        ``cache_dir=...``, ...); an unknown name is a :class:`SentcompError`.

    The steps: the request checked, the options resolved for ``lm`` (:meth:`ExtractionOptions.resolved`), texts
    encoded and missing chunks found (:func:`plan_extraction`), those computed and cached
    (:func:`compute_missing`), every kind gathered (:func:`gather_features`).

    Returns:
      ``{kind: np.ndarray}`` for each requested kind, and ``"metadata"``: a dict.
    """
    request = RowRequest(tuple(kinds) if not isinstance(kinds, str) else (kinds,), prompt,
                         tuple(words) if words is not None else None)
    return extract_rows(lm, texts, [request], options, **settings)[0]


@dataclasses.dataclass(frozen=True)
class RowRequest:
    """One extraction among several over the same texts (:func:`extract_rows`): ``extract_features(lm, texts,
    kinds, words=words, prompt=prompt)``, on ``texts`` (a subset of the call's texts; None: all of them)."""

    kinds: tuple[str, ...]
    prompt: str | None = None
    words: tuple[str, ...] | None = None
    texts: tuple[str, ...] | None = None


def extract_rows(lm: LanguageModel, texts: Sequence[str], requests: Sequence[RowRequest],
                 options: ExtractionOptions | None = None, **settings) -> list[dict[str, Any]]:
    """What :func:`extract_features` returns for each of ``requests`` (its kinds, words and prompt, on its texts),
    reading each text once when the model keeps a key/value cache (``lm.prefill_fn``).

    **One pass over the texts** (:func:`compute_shared`): each text ``s`` is read once (``prefill``) followed by
    one request's prompt π₁ (the lead: the first request with a prompt among those reading ``s``), which gives the
    rows ``s`` (the state at ``s``'s last token) and ``s + π₁``; every other request's row ``s + π`` continues
    from the cached keys and values of ``s`` (``continue_fn``, π₁'s keys masked out), which costs only the
    prompt's tokens: the same features as reading ``s + π`` whole (to float32 rounding), since a causal
    decoder's states at ``s``'s positions do not depend on what follows. A row
    continues only where this is exact, i.e. when its tokens are ``s``'s tokens followed by the prompt's (the text
    not truncated, the tokenizer not merging across the boundary); the other rows, and every row of a model
    without a cache or of a request for ``p_f``, are read whole as :func:`extract_features` reads them. Results
    are cached per request exactly as :func:`extract_features` caches them (the same keys), so a later call of
    either finds them."""
    options = (options or ExtractionOptions()).replace(**settings)
    resolved = options.resolved(lm)
    kinds_of = [_check_request(list(r.texts) if r.texts is not None else texts, r.kinds, r.words, options)
                for r in requests]
    plans = [plan_extraction(lm, list(r.texts) if r.texts is not None else list(texts), kinds, r.words, r.prompt,
                             resolved) for r, kinds in zip(requests, kinds_of)]
    pending = [i for i, plan in enumerate(plans) if plan.todo and "p_f" not in kinds_of[i]]
    if lm.prefill_fn is not None and lm.continue_fn is not None and len(pending) > 1:
        compute_shared(lm, texts, [plans[i] for i in pending])
    return [_finish(plan, kinds) for plan, kinds in zip(plans, kinds_of)]


def _finish(plan: _Extraction, kinds: tuple[str, ...]) -> dict[str, Any]:
    """The chunks of ``plan`` still missing computed (:func:`compute_missing`), then every kind gathered with the
    call's metadata."""
    key_dir, n_texts = plan.store.directory, len(plan.encoding.token_ids)
    p_f_file = None
    if "p_f" in kinds:
        assert key_dir is not None  # _check_request refuses p_f without a cache_dir, so the store has a directory
        p_f_file = _p_f_memmap(key_dir, n_texts, int(plan.lm.phi.shape[0]), plan.options.chunk_size, plan.missing)
    computed = plan.todo
    compute_missing(plan, kinds, p_f_file)
    result: dict[str, Any] = gather_features(plan, kinds)
    if p_f_file is not None:
        assert p_f_file.filename is not None  # _p_f_memmap opens the memmap from a path, which it keeps
        result["p_f"] = np.load(p_f_file.filename, mmap_mode="r")
        del p_f_file
    result["metadata"] = {
        **plan.store.manifest,
        "kinds": list(kinds),
        "words": plan.words.to_json() if plan.words else None,
        "n_tokens": int(sum(len(ids) for ids in plan.encoding.token_ids)),
        "n_truncated": plan.encoding.n_truncated,
        "cache_dir": str(key_dir) if key_dir is not None else None,
        "computed_chunks": sorted({*computed, *plan.shared_chunks}),
        "continued_rows": plan.continued_rows,
    }
    return result


# ----------------------------------------------------------------------------- one pass, several prompts


def _missing_kinds(plan: _Extraction) -> tuple[str, ...]:
    return tuple(dict.fromkeys(kind for chunk in plan.todo for kind in plan.missing[chunk]))


def _needed_rows(plan: _Extraction) -> np.ndarray:
    """The rows (of the plan's texts) in chunks that lack some kind."""
    size, n = plan.options.chunk_size, len(plan.encoding.token_ids)
    return np.concatenate([np.arange(c * size, min((c + 1) * size, n)) for c in plan.todo]).astype(np.int64)


def continuation(text_ids: np.ndarray, row_ids: np.ndarray) -> np.ndarray | None:
    """The tokens a row adds to its text's tokens (``row_ids = text_ids + suffix``), or None when the row does not
    start with the text's tokens (a truncated text, or a tokenizer that merges across the boundary): then it is
    read whole. An empty suffix (the row is the text itself) reads the text's own state."""
    if len(row_ids) < len(text_ids) or not np.array_equal(row_ids[:len(text_ids)], text_ids):
        return None
    return np.asarray(row_ids[len(text_ids):])


# How a reader of the one pass gets its row's state (:func:`_shared_fn`): at the text's last token, at the end of
# the prefilled row (the text + the lead reader's suffix), or (an int, its suffix's padded length) by continuing
# the text's cached keys/values.
READ_TEXT, READ_LEAD = "text", "lead"


@functools.lru_cache(maxsize=32)
def _shared_fn(prefill_fn, continue_fn, phi_fn, readers: tuple[tuple[tuple[str, ...], str | int], ...],
               vocab_chunk: int, mesh: jax.sharding.Mesh):
    """The jitted ``(params, tables, ids, mask, text_mask, *suffixes) -> [{kind: [B, ...]} per reader]``: each
    text read once followed by the lead reader's suffix (``ids``, ``mask``; ``text_mask`` marks the text's own
    tokens), then each reader ``(kinds, how)``'s row ``s + π``:

    - ``READ_TEXT`` (the text alone): the state at the text's last token, which is the text's own last state,
      as a causal decoder's states at ``s``'s positions do not depend on what follows;
    - ``READ_LEAD``: the prefilled row's last state;
    - a suffix length: the last state of its suffix tokens continued from the cache with the lead's suffix masked
      out (``suffixes``: ``ids [B, length], mask [B, length]`` per such reader, in order); masked keys are not
      attended to and take no position (:func:`sentcomp.models.layers.positions`), so this is ``s + π`` read
      whole.

    ``tables["word_ids"]``: one word-id array per reader."""

    def compute(params, tables, token_ids, mask, text_mask, *suffixes):
        hidden, cache = prefill_fn(params, token_ids, mask)
        text_cache = cache.replace(mask=text_mask.astype(cache.mask.dtype))
        phi = phi_fn(params).astype(jnp.float32)
        arrays = iter(suffixes)
        outputs = []
        for index, (kinds, how) in enumerate(readers):
            if how == READ_TEXT:
                f = last_token_features(hidden, text_mask)
            elif how == READ_LEAD:
                f = last_token_features(hidden, mask)
            else:
                suffix_ids, suffix_mask = next(arrays), next(arrays)
                f = last_token_features(continue_fn(params, text_cache, suffix_ids, suffix_mask), suffix_mask)
            outputs.append(kind_values(f.astype(jnp.float32), phi, kinds, tables["word_ids"][index],
                                       tables["projection"], vocab_chunk))
        return outputs

    batch, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    n_suffix_arrays = 2 * sum(1 for _, how in readers if isinstance(how, int))
    return jax.jit(compute, in_shardings=(whole, whole, batch, batch, batch, *[batch] * n_suffix_arrays),
                   out_shardings=batch)


def _text_mask(mask: np.ndarray, text_lengths: Sequence[int]) -> np.ndarray:
    """``mask`` ``[B, T]`` of a batch whose rows are texts followed by a suffix, keeping only each text's own
    ``text_lengths`` tokens (rows past them, batch padding, keep their one dummy token)."""
    text_only = mask.copy()
    for row, length in enumerate(text_lengths):
        text_only[row, length:] = 0
    return text_only


def _suffix_arrays(suffixes: Sequence[np.ndarray], batch_size: int, length: int, pad: int):
    """``(ids, mask) [batch_size, length]``: the suffixes right-padded; rows past them (batch padding) hold one
    dummy token so that no row is empty."""
    ids = np.full((batch_size, length), pad, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    mask[len(suffixes):, 0] = 1
    for row, suffix in enumerate(suffixes):
        ids[row, :len(suffix)], mask[row, :len(suffix)] = suffix, 1
    return ids, mask


def compute_shared(lm: LanguageModel, texts: Sequence[str], plans: Sequence[_Extraction]) -> None:
    """The missing chunks of every plan, the texts read once (:func:`extract_rows`): the texts grouped by the plans
    that need them, so that a batch of texts serves all of those; each text read with its group's lead suffix (the
    first plan with a prompt) and every other plan's row continued from the text's key/value cache
    (:func:`continuation`, :func:`_shared_fn`), in batches padded to lengths fitted to the group
    (:func:`sentcomp.data.text.fitted_buckets`); the rows that do not continue read whole (:func:`_compute_chunk`).
    Every chunk is stored as it would be by :func:`compute_missing` and kept in the plan's ``fresh``."""
    options = plans[0].options
    mesh, buckets, max_length = options.mesh, options.buckets, options.max_length
    assert mesh is not None and buckets is not None and max_length is not None  # plan_extraction resolved them
    try:
        base = encode_texts(lm.tokenizer, texts, max_length, None, options.keep_prompt_trailing_space,
                            options.truncation).token_ids
    except SentcompError:  # an empty text with no prompt: nothing to continue from; every row is read whole
        return
    pool = {text_: index for index, text_ in enumerate(texts)}
    kinds = [_missing_kinds(plan) for plan in plans]
    readers: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # text -> [(plan, row, suffix)]
    whole: list[list[int]] = [[] for _ in plans]  # per plan, the rows read whole
    for p, plan in enumerate(plans):
        row_texts = _plan_texts(plan, pool)
        for row in _needed_rows(plan):
            text_index = pool[row_texts[row]]
            suffix = continuation(base[text_index], plan.encoding.token_ids[row])
            if suffix is None or (len(suffix) == 0) != _reads_text(plan):  # an empty suffix only for the text itself
                whole[p].append(int(row))
            else:
                readers.setdefault(text_index, []).append((p, int(row), suffix))
    values: list[dict[str, np.ndarray]] = [{} for _ in plans]
    lengths = [max([len(s) for entries in readers.values() for q, _, s in entries if q == p], default=0)
               for p in range(len(plans))]
    params = parallel.replicate(cast_floats(lm.params, COMPUTE_DTYPES[options.compute_dtype]), mesh)
    tables = parallel.replicate({"word_ids": tuple(jnp.asarray(plan.words.token_ids if plan.words else [0], jnp.int32)
                                                   for plan in plans),
                                 "projection": _projection_table(lm, plans, kinds)}, mesh)
    pad = text.pad_id(lm.tokenizer)
    groups: dict[tuple[int, ...], list[int]] = {}
    for text_index, entries in readers.items():
        groups.setdefault(tuple(sorted(p for p, _, _ in entries)), []).append(text_index)
    n_tokens = sum(len(base[i]) for i in readers) + sum(len(s) for e in readers.values() for _, _, s in e)
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"features {lm.name} ({len(plans)} rows, one pass)",
               disable=not options.progress)
    for group, text_indices in groups.items():
        lead = next((p for p in group if not _reads_text(plans[p])), None)
        group_readers = tuple((kinds[p], READ_TEXT if _reads_text(plans[p]) else READ_LEAD if p == lead else lengths[p])
                              for p in group)
        fn = _shared_fn(lm.prefill_fn, lm.continue_fn, lm.phi_fn, group_readers, options.vocab_chunk, mesh)
        group_tables = {**tables, "word_ids": tuple(tables["word_ids"][p] for p in group)}
        by_text = {i: {p: (row, suffix) for p, row, suffix in readers[i]} for i in text_indices}
        prefilled = [np.concatenate([base[i], by_text[i][lead][1]]) if lead is not None else base[i]
                     for i in text_indices]
        fitted = fitted_buckets(batch_maxima([len(ids) for ids in prefilled], options.batch_size), buckets)
        for batch in make_batches(prefilled, options.batch_size, fitted, pad):
            batch_texts = [text_indices[k] for k in batch.indices]
            arrays = [batch.token_ids, batch.mask, _text_mask(batch.mask, [len(base[i]) for i in batch_texts])]
            for p, (_, how) in zip(group, group_readers):
                if isinstance(how, int):
                    arrays += _suffix_arrays([by_text[i][p][1] for i in batch_texts], options.batch_size, how, pad)
            outputs = parallel.apply_to_batch(fn, tuple(arrays), mesh, params, group_tables)
            for p, output in zip(group, outputs):
                rows = np.array([by_text[i][p][0] for i in batch_texts])
                _place(values[p], rows, {kind: value[:len(batch_texts)] for kind, value in output.items()},
                       len(plans[p].encoding.token_ids))
            bar.update(batch.n_tokens + sum(len(by_text[i][p][1]) for i in batch_texts for p in group if p != lead))
    bar.close()
    for p, plan in enumerate(plans):
        if whole[p]:
            _read_whole(plan, kinds[p], np.array(whole[p]), values[p])
        plan.continued_rows = int(sum(1 for entries in readers.values() for q, _, _ in entries if q == p))
        _store(plan, values[p])


def _plan_texts(plan: _Extraction, pool: dict[str, int]) -> list[str]:
    """The plan's texts, checked to be among the pass's (``pool``: text -> index)."""
    own = plan.texts
    unknown = [t for t in own if t not in pool]
    if unknown:
        raise SentcompError(f"A row request's texts must be among the pass's texts; {len(unknown)} are not, e.g. "
                            f"{unknown[0][:60]!r}.")
    return list(own)


def _reads_text(plan: _Extraction) -> bool:
    return plan.encoding.prompt is None


def _projection_table(lm: LanguageModel, plans: Sequence[_Extraction], kinds: Sequence[tuple[str, ...]]):
    projections = {plan.projection for plan, k in zip(plans, kinds) if "projected_p_f" in k}
    if len(projections) > 1:
        raise SentcompError(f"Row requests of one pass must share one random projection, got {sorted(projections)}.")
    vocab_size = int(lm.phi.shape[0])
    return (random_projection(vocab_size, *projections.pop()) if projections
            else jnp.zeros((vocab_size, 1), jnp.float32))


def _place(values: dict[str, np.ndarray], rows: np.ndarray, outputs: dict[str, np.ndarray], n_rows: int) -> None:
    """Each kind's ``outputs`` written into ``values[kind]`` (``[n_rows, ...]``, made on first use) at ``rows``."""
    for kind, value in outputs.items():
        if kind not in values:
            values[kind] = np.zeros((n_rows, *value.shape[1:]), value.dtype)
        values[kind][rows] = value


def _read_whole(plan: _Extraction, kinds: tuple[str, ...], rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """The plan's ``rows`` read whole (as :func:`compute_missing` reads them), into ``values``."""
    options, lm = plan.options, plan.lm
    params, tables = _replicated_inputs(plan, kinds)
    fn = _batch_fn(lm.hidden_fn, lm.phi_fn, kinds, options.vocab_chunk, options.mesh)
    outputs = _compute_chunk(fn, params, tables, [plan.encoding.token_ids[r] for r in rows], options.batch_size,
                             options.buckets, text.pad_id(lm.tokenizer), options.mesh, lambda *_: None)
    _place(values, rows, outputs, len(plan.encoding.token_ids))


def _store(plan: _Extraction, values: dict[str, np.ndarray]) -> None:
    """Every missing chunk of the plan from ``values`` (rows of the plan's texts), stored and kept in ``fresh``;
    the plan then has nothing left to compute."""
    for chunk in plan.todo:
        rows = plan.chunk_rows(chunk)
        for kind in plan.missing[chunk]:
            plan.store.put(plan.stored[kind], chunk, values[kind][rows])
            plan.fresh[plan.stored[kind], chunk] = values[kind][rows]
    plan.shared_chunks = plan.todo
    plan.missing = {chunk: () for chunk in plan.missing}
