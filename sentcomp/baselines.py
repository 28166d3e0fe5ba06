"""The paper's BERT baseline (Table 1): sentence features from a BERT-family encoder.

``bert_features(encoder, texts, prompt=None, pooling="mlm_cls")`` encodes ``[CLS] text prompt [SEP]`` (the prompt
goes before ``[SEP]``, as in the authors' code; its trailing space is stripped as :mod:`sentcomp.data.text` does) and
returns one vector per text:

- ``"mlm_cls"`` (the paper's): ``t(h_[CLS])``, the ``[CLS]`` state after the masked-LM head's transform
  ``t(h) = LN(GELU(W_t h + b_t))`` (:func:`sentcomp.models.bert.mlm_transform`);
- ``"cls"``: the last layer's ``[CLS]`` state ``h_[CLS]``;
- ``"mean"``: the mean of the last layer's states over the real tokens (``[CLS]`` and ``[SEP]`` included).

An encoder without MLM head (e.g. ``load("all-minilm-l6-v2")``) asked for ``"mlm_cls"`` falls back to
``fallback_pooling`` (default ``"cls"``) with a warning saying so.

Batches are fixed-shape (length buckets) and split over every device; with ``cache_dir`` the result is stored
under a key hashing the model's parameters, tokenizer, texts, prompt, pooling and truncation, and reused.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sentcomp import parallel
from sentcomp.data.text import (
    effective_prompt,
    encode_with_specials,
    length_buckets,
    make_batches,
    pad_id,
    tokenizer_fingerprint,
)
from sentcomp.errors import SentcompError
from sentcomp.models import bert
from sentcomp.models.base import LanguageModel
from sentcomp.results import storage

POOLINGS = ("mlm_cls", "cls", "mean")


def resolve_pooling(encoder: LanguageModel, pooling: str, fallback_pooling: str = "cls") -> str:
    """``pooling``, or ``fallback_pooling`` (with a warning) when ``"mlm_cls"`` is asked of an encoder without MLM
    head."""
    if pooling not in POOLINGS or fallback_pooling not in POOLINGS[1:]:
        raise SentcompError(f"pooling must be one of {POOLINGS} and fallback_pooling one of {POOLINGS[1:]}; got "
                            f"{pooling!r} / {fallback_pooling!r}.")
    if encoder.family != bert.FAMILY:
        raise SentcompError(f"BERT features need a BERT-family encoder; {encoder.name} is a {encoder.family!r} model.")
    if pooling == "mlm_cls" and not bert.has_mlm_head(encoder.params):
        warnings.warn(f"{encoder.name} has no masked-LM head (checkpoint without cls.predictions.transform.*), so the "
                      f"paper's [CLS]-after-MLM-transform feature is unavailable; using pooling={fallback_pooling!r}.",
                      stacklevel=3)
        return fallback_pooling
    return pooling


@functools.lru_cache(maxsize=16)
def _pool_fn(config, hidden_fn, pooling: str, mesh: jax.sharding.Mesh):
    """The jitted ``(params, ids, mask) -> [B, d]`` pooled features, batch split over ``mesh``."""

    def pool(params, token_ids, mask):
        hidden = hidden_fn(params, token_ids, mask).astype(jnp.float32)
        if pooling == "mean":
            weights = mask.astype(jnp.float32)[..., None]
            return jnp.sum(hidden * weights, axis=1) / jnp.sum(weights, axis=1)
        cls = hidden[:, 0]
        return bert.mlm_transform(config, params, cls) if pooling == "mlm_cls" else cls

    return jax.jit(pool, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh),
                                       parallel.batch_sharding(mesh)), out_shardings=parallel.batch_sharding(mesh))


def bert_features(
    encoder: LanguageModel,
    texts: Sequence[str],
    prompt: str | None = None,
    pooling: str = "mlm_cls",
    *,
    fallback_pooling: str = "cls",
    keep_prompt_trailing_space: bool = False,
    truncation: str = "start",
    max_length: int | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> np.ndarray:
    """BERT sentence features ``[N, d]`` (float32); see the module docstring for ``pooling`` and the prompt."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise SentcompError("texts must be a list of strings.")
    if encoder.tokenizer is None:
        raise SentcompError(f"{encoder.name} has no tokenizer; load it from a directory with tokenizer files.")
    pooling = resolve_pooling(encoder, pooling, fallback_pooling)
    prompt = effective_prompt(prompt, keep_prompt_trailing_space)
    max_length = min(max_length or encoder.max_length, encoder.max_length)
    token_ids = encode_with_specials(encoder.tokenizer, texts, max_length, prompt, truncation)
    key = {"model": encoder.name, "model_fingerprint": encoder.fingerprint if cache_dir else None,
           "code_fingerprint": storage.code_fingerprint(__name__, "sentcomp.models.bert", "sentcomp.models.layers"),
           "tokenizer_fingerprint": tokenizer_fingerprint(encoder.tokenizer), "prompt": prompt, "pooling": pooling,
           "truncation": truncation, "max_length": max_length, "texts_fingerprint": storage.texts_fingerprint(texts)}
    path = Path(cache_dir) / f"bert-{storage.content_hash(key)}.npy" if cache_dir is not None else None
    cached = parallel.main_decides(lambda: np.load(path) if path is not None and path.is_file() else None)
    if cached is not None:
        return cached

    mesh = mesh if mesh is not None else parallel.data_mesh()
    batch_size = parallel.pad_to_multiple(max(1, batch_size), mesh.size)
    fn = _pool_fn(encoder.config, encoder.hidden_fn, pooling, mesh)
    params = parallel.replicate(encoder.params, mesh)
    out = np.zeros((len(texts), encoder.config.hidden_size), np.float32)
    batches = make_batches(token_ids, batch_size, length_buckets(max_length),
                           pad_id(encoder.tokenizer)) if texts else []
    for batch in tqdm(batches, desc=f"bert features {encoder.name}", disable=not progress):
        out[batch.indices] = parallel.apply_to_batch(fn, (batch.token_ids, batch.mask),
                                                     mesh, params)[: len(batch.indices)]
    if path is not None and parallel.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.save_npy(path, out)
        storage.write_json(path.with_suffix(".json"), key)
    return out
