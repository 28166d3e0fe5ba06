"""The shared transformer pieces, written once: what the GPT-2 and BERT families (``sentcomp.models.gpt2``,
``bert``) and the rotary decoder families (:mod:`sentcomp.models.decoder`: Llama, Qwen2, Mistral, GPT-NeoX,
Gemma) build their networks and their :class:`LanguageModel` views from.

- Config checks: :func:`check_config` (heads split the width, a known activation from :data:`ACTIVATIONS`).
- Layers: :func:`layer_norm` (torch's LayerNorm, exactly), :class:`RMSNorm` (``g ⊙ x/rms(x)``, or Gemma's
  ``(1 + g) ⊙ x/rms(x)``), :func:`dense` (Dense with an N(0, σ²) kernel).
- Attention: :func:`positions` (rotary/learned positions count the real tokens), :func:`visible_keys` (which keys
  a query may see), :func:`rotary_cos_sin` + :func:`apply_rotary` (rotary position embeddings, full or partial),
  :func:`attend` (softmax over the visible keys in float32, times the values in their dtype; grouped-query
  attention when there are fewer value heads than score heads).
- The paper's **Quad head** (Section 6 of arXiv 2010.03648): one d×d linear layer with bias after the final norm,
  ``f(s) = W·h + b`` where ``h`` is the final-norm output, with Φ untied from the input embeddings.
  :func:`quad_head` is the layer (initialised to the identity, so ``f(s) = h`` until trained), :func:`quad_config`
  the config of a randomly initialised Quad model, :func:`add_quad_head` puts it on pretrained weights.
- The :class:`LanguageModel` view: :func:`language_model_view` (what each family's ``language_model`` returns),
  :func:`check_tokenizer_fits`, :func:`check_length`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sentcomp.errors import SentcompError
from sentcomp.models.base import LanguageModel

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# HF ``activation_function``/``hidden_act`` names -> jnp functions (transformers/activations.py semantics).
ACTIVATIONS = {
    "gelu_new": lambda x: 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}

QUAD_HEAD = "quad_head"  # the Quad head's parameters, ``params["quad_head"] = {"kernel" [d, d], "bias" [d]}``
QUAD_CONFIG_KEY = "sentcomp_quad_head"  # config.json flag of HF-format checkpoints saved with the Quad head


def check_config(model: str, config, width: str, heads: str, activation: str) -> None:
    """The checks GPT-2's and BERT's configs share (errors name the ``model``): the width ``config.<width>``
    splits into ``config.<heads>`` attention heads, and ``config.<activation>`` is one of :data:`ACTIVATIONS`."""
    if getattr(config, width) % getattr(config, heads):
        raise SentcompError(f"{model} config: {width}={getattr(config, width)} is not divisible by "
                            f"{heads}={getattr(config, heads)}.")
    if getattr(config, activation) not in ACTIVATIONS:
        raise SentcompError(f"{model} config: {activation} {getattr(config, activation)!r} is not supported; "
                            f"choose one of {sorted(ACTIVATIONS)}.")


# ---------------------------------------------------------------------------------------------------- layers


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    """``γ ⊙ (x − μ)/sqrt(σ² + ε) + β`` over the last axis, as torch computes it: statistics and normalisation in
    float32 (Flax's default), the output in the dtype of ``x`` and the parameters (bf16 for a bf16 model)."""
    # use_fast_variance=False: E[(x-μ)²] like torch, not E[x²]-μ² (which loses precision).
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


class RMSNorm(nn.Module):
    """``(offset + g) ⊙ x / sqrt(mean(x²) + ε)`` over the last axis: ``offset = 0`` is Llama's RMSNorm (``g``
    initialised to 1), ``offset = 1`` Gemma's, which stores ``w = g − 1`` (initialised to 0). Computed in float32
    (the gain too) and returned in ``x``'s dtype, so a bf16 model's activations stay bf16."""

    eps: float
    offset: float = 0.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32).astype(jnp.float32)
        dtype, x = x.dtype, x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return ((self.offset + scale) * normed).astype(dtype)


def dense(features: int, stddev: float, name: str) -> nn.Dense:
    """A Dense layer with bias, kernel ``[in, out]`` initialised N(0, stddev²), bias 0."""
    return nn.Dense(features, kernel_init=nn.initializers.normal(stddev), name=name)


# ------------------------------------------------------------------------------------------------- attention


def positions(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among the real ones, ``cumsum(mask) − 1`` (0 on left padding), ``[B, T]``: with
    right padding these are ``0..T-1``, and left padding gives the same features as no padding."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)


def visible_keys(attention_mask: jax.Array, causal: bool) -> jax.Array:
    """Whether query t may attend to key s, bool, broadcastable to ``[B, T, T]`` (query, key): s is a real token
    (``attention_mask [B, T]``) and, if ``causal``, ``s ≤ t``."""
    real = attention_mask.astype(bool)[:, None, :]
    if not causal:
        return real
    length = attention_mask.shape[1]
    return jnp.tril(jnp.ones((length, length), bool))[None] & real


def rotary_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``cos(p·ω), sin(p·ω)`` in float32, shape ``positions.shape + (rotary_dim,)``: the ``rotary_dim/2``
    frequencies ``ω`` repeated over both halves (Hugging Face's half-split convention)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary position embedding of ``x [B, T, heads, head_dim]`` with ``cos, sin [B, T, r]`` (:func:`rotary_cos_sin`):
    the first ``r`` dims ``y = [y₁, y₂]`` (two halves) become ``y ⊙ cos + [−y₂, y₁] ⊙ sin``, the other
    ``head_dim − r`` pass unchanged (partial rotary, GPT-NeoX's ``rotary_pct``). Computed in float32 (the tables'
    dtype), returned in ``x``'s dtype (bf16 for a bf16 model)."""
    r = cos.shape[-1]
    y, rest = x[..., :r], x[..., r:]
    y1, y2 = jnp.split(y, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = (y * cos + jnp.concatenate([-y2, y1], axis=-1) * sin).astype(x.dtype)
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated


def attend(scores: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """Multi-head attention output ``[B, T, heads·head_dim]``: ``softmax(scores)`` over the visible keys (the
    others get float32's most negative score: finite, so a query that sees no key averages uniformly instead of
    giving NaN), times ``values [B, T, kv_heads, head_dim]``. ``scores [B, heads, T, T]`` (query, key), already
    scaled; ``visible [B, T, T]`` as :func:`visible_keys` gives it. Grouped-query attention: with
    ``kv_heads < heads``, score head ``h`` uses value head ``h // (heads / kv_heads)`` (Hugging Face's
    ``repeat_kv`` order); ``kv_heads = heads`` is plain multi-head attention.

    Precision: the masking and softmax are computed in float32 (bf16 scores are upcast), and the attention
    weights are cast back to the values' dtype, so the product with V runs in the model's dtype (bf16 with bf16
    parameters) and the output has that dtype."""
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    scores = jnp.where(visible[:, None], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    batch, heads, queries, keys = weights.shape
    kv_heads = values.shape[2]
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, queries, keys)
    out = jnp.einsum("bkgqs,bskd->bqkgd", grouped, values)
    return out.reshape(batch, queries, -1)


# -------------------------------------------------------------------------------------------- the Quad head


def _identity(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(*shape, dtype=dtype)


def quad_head(features: int) -> nn.Dense:
    """The Quad head: a ``features × features`` Dense layer with bias, named ``quad_head``, initialised to the
    identity (bias 0)."""
    return nn.Dense(features, kernel_init=_identity, name=QUAD_HEAD)


def quad_config(config):
    """``config`` (a family's config dataclass) with the Quad architecture on: the head and an untied Φ."""
    return dataclasses.replace(config, quad_head=True, tie_word_embeddings=False)


def add_quad_head(params: dict, config, phi: str, embedding: str) -> tuple[dict, Any]:
    """The Quad architecture on top of pretrained weights, and its config: the head at the identity (so f(s)
    starts as the pretrained features) and Φ = ``params[phi]``, a copy of the input embeddings
    ``params[embedding]["embedding"]`` if they were tied. A head or Φ the weights already have is kept."""
    params = dict(params)
    if QUAD_HEAD not in params:
        d = params[embedding]["embedding"].shape[1]
        params[QUAD_HEAD] = quad_head(d).init(jax.random.key(0), jnp.zeros((1, d)))["params"]
    params.setdefault(phi, jnp.array(params[embedding]["embedding"]))
    return params, quad_config(config)


# ------------------------------------------------------------------------------------ the LanguageModel view


def language_model_view(family: str, config, params, tokenizer, name: str, hidden_fn: Callable,
                        phi_fn: Callable[[Any], jax.Array], max_length: int) -> LanguageModel:
    """A family's parameters as a :class:`LanguageModel`: ``lm.hidden_fn`` is the family's
    ``hidden_fn(config, params, token_ids, attention_mask)`` with ``config`` bound, ``lm.phi_fn`` its
    ``phi_fn(params)``; the tokenizer (None: token ids only) must fit the vocabulary."""
    check_tokenizer_fits(tokenizer, config.vocab_size, name)
    return LanguageModel(name=name, family=family, config=config, params=params,
                         hidden_fn=functools.partial(hidden_fn, config), phi_fn=phi_fn, tokenizer=tokenizer,
                         max_length=max_length)


def check_tokenizer_fits(tokenizer, vocab_size: int, name: str) -> None:
    """A clear error if ``tokenizer`` (None: token ids only) has ids beyond the model's ``vocab_size`` embeddings."""
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise SentcompError(
            f"Model {name}: its tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
            "embeddings; pass a tokenizer matching the model's vocabulary."
        )


def check_length(token_ids: jax.Array, max_length: int, model: str) -> None:
    """A clear error if the sequences ``token_ids [B, T]`` are longer than the model's context."""
    if token_ids.shape[1] > max_length:
        raise SentcompError(
            f"Sequences of {token_ids.shape[1]} tokens exceed this {model}'s context of {max_length}; truncate "
            "them (sentcomp.features and sentcomp.baselines do)."
        )
