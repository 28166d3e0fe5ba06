"""The shared transformer pieces, written once: what the GPT-2, Llama and BERT families (``sentcomp.models.gpt2``,
``llama``, ``bert``) build their networks and their :class:`LanguageModel` views from.

- Config checks: :func:`check_config` (heads split the width, a known activation from :data:`ACTIVATIONS`).
- Layers: :func:`layer_norm` (torch's LayerNorm, exactly), :func:`dense` (Dense with an N(0, σ²) kernel).
- Attention: :func:`positions` (rotary/learned positions count the real tokens), :func:`visible_keys` (which keys
  a query may see), :func:`attend` (softmax over the visible keys in float32, times the values in their dtype).
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


def attend(scores: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """Multi-head attention output ``[B, T, heads·head_dim]``: ``softmax(scores)`` over the visible keys (the
    others get float32's most negative score: finite, so a query that sees no key averages uniformly instead of
    giving NaN), times ``values [B, T, heads, head_dim]``. ``scores [B, heads, T, T]`` (query, key), already
    scaled; ``visible`` as :func:`visible_keys` gives it.

    Precision: the masking and softmax are computed in float32 (bf16 scores are upcast), and the attention
    weights are cast back to the values' dtype, so the product with V runs in the model's dtype (bf16 with bf16
    parameters) and the output has that dtype."""
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    scores = jnp.where(visible[:, None], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, values)
    return out.reshape(*out.shape[:2], -1)


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
