"""The decoder-only transformer with rotary embeddings that the Llama, Qwen2, Mistral, GPT-NeoX (Pythia) and Gemma
families share, written once: its config, network, :class:`LanguageModel` view, Hugging Face name maps, loading
and export. A family module (``llama.py``, ``qwen2.py``, ...) is a config mapping plus a :class:`Family` record.

One block, for hidden states ``x [B, T, d]`` (``N₁``, ``N₂`` the block's two norms):

    sequential (Llama):   x ← x + Attn(N₁(x)),  x ← x + MLP(N₂(x))
    parallel (GPT-NeoX):  x ← x + Attn(N₁(x)) + MLP(N₂(x))

- norms (``norm``): ``"rms"`` ``g ⊙ x/rms(x)``; ``"rms_plus_one"`` ``(1 + w) ⊙ x/rms(x)`` (Gemma);
  ``"layer"`` ``γ ⊙ (x − μ)/σ + β`` (GPT-NeoX), with ``rms(x) = sqrt(mean(x²) + ε)``;
- MLP (``mlp``): ``"gated"`` ``W_down(act(W_gate x) ⊙ W_up x)`` (SwiGLU with SiLU, GeGLU with tanh-GELU);
  ``"plain"`` ``W_down act(W_up x)``, ``act`` any of :data:`layers.ACTIVATIONS`;
- attention: causal, grouped-query (``num_attention_heads`` query heads share ``num_key_value_heads`` key/value
  heads), scores ``q·k/sqrt(head_dim)``, ``head_dim`` free (Gemma's need not be ``d/heads``), optional biases on the
  q/k/v projections (``qkv_bias``, Qwen2) and on the output projection (``output_bias``), q/k/v from separate
  projections or one fused per-head ``[q; k; v]`` projection (``fused_qkv``, GPT-NeoX), optionally a sliding
  window (``sliding_window``: query t sees key s only if ``t − s < window``, on the layers ``layer_types`` marks
  ``"sliding_attention"``; Mistral, Qwen2);
- rotary embeddings on the first ``rotary_dim = partial_rotary_factor · head_dim`` dims of each query/key head
  (Hugging Face's half-split convention, :func:`layers.apply_rotary`), frequencies ``ω_i = θ^(−2i/rotary_dim)``
  optionally rescaled (``linear``, Llama 3.1's ``llama3``: :func:`rotary_inverse_frequencies`);
- input embeddings optionally multiplied by ``sqrt(d)`` (``scale_embeddings``, Gemma); output embeddings Φ tied
  to the input ones or untied (``params["lm_head"]``).

Positions count the real tokens (``cumsum(mask) − 1``): right padding changes nothing, and left padding gives the
same features as no padding. The blocks are one ``nn.scan`` over layer-stacked parameters (leading axis = layer,
:func:`layers.layer_stack`), so a 30-layer model compiles like a 1-layer one; ``scan_layers=False`` unrolls the same
parameters, ``remat`` rematerialises each layer in the backward pass, and ``attention`` picks the attention
kernel (:func:`layers.self_attention`: XLA, cuDNN, or query chunks whose memory grows as T, not T²). These four
execution fields (:data:`layers.EXECUTION_FIELDS`) change how the model runs, not what it computes, and are not
written to Hugging Face configs; :func:`layers.with_execution` changes them on a loaded model.

The sentcomp view: ``hidden_fn(params, ids, mask) -> [B, T, d]`` is the final norm's output f(s) (or the Quad
head's output), ``phi_fn(params) -> [V, d]`` is Φ. Parameter names (the same in every family): ``embed_tokens``,
``layers/{self_attn/{q,k,v,o}_proj | self_attn/qkv_proj, mlp/{gate,up,down}_proj, input_layernorm,
post_attention_layernorm}``, ``norm``, ``lm_head`` (untied), ``quad_head``. Key/value cache: ``prefill(params, ids,
mask) -> (hidden, cache)`` reads a sequence and keeps its keys/values (:class:`layers.KVCache`), and
``continue_hidden(params, cache, ids, mask) -> [B, T, d]`` gives the features of tokens continuing it, equal to
the whole sequence's (``lm.prefill_fn`` / ``lm.continue_fn``; a k-shot prefix shared by every text is read once).

Precision: with bf16-cast parameters every matrix product takes bf16 operands and the residual stream stays bf16;
norms, the rotary rotation and the attention softmax compute in float32 and return bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sentcomp.errors import SentcompError
from sentcomp.models import hf, layers
from sentcomp.models.base import FamilyFacts, LanguageModel

NORMS = ("rms", "rms_plus_one", "layer")
MLPS = ("gated", "plain")
ROPE_TYPES = ("default", "linear", "llama3")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")  # HF's
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyperparameters of a rotary decoder (names follow Hugging Face's Llama config; defaults are Llama's)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    quad_head: bool = False  # the paper's Quad architecture: a d×d linear layer (with bias) after the final norm
    norm: str = "rms"  # one of NORMS
    norm_eps: float = 1e-5
    mlp: str = "gated"  # one of MLPS
    hidden_act: str = "silu"  # a layers.ACTIVATIONS name
    mlp_bias: bool = False
    qkv_bias: bool = False
    output_bias: bool = False  # of the attention's output projection
    fused_qkv: bool = False  # one [q; k; v]-per-head projection (GPT-NeoX's query_key_value)
    parallel_residual: bool = False  # x + Attn(N₁x) + MLP(N₂x) (GPT-NeoX) instead of two sequential residuals
    scale_embeddings: bool = False  # input embeddings × sqrt(hidden_size) (Gemma)
    sliding_window: int | None = None  # keys at most window − 1 positions back, on the sliding layers
    layer_types: tuple[str, ...] = ()  # per layer, one of LAYER_TYPES; () = every layer sliding if a window is set
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # fraction of each head's dims that are rotated (GPT-NeoX's rotary_pct)
    # Rotary frequency scaling (Hugging Face's rope_parameters): "default" (none), "linear" or "llama3".
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3 only
    # Per-frequency divisors of ω (GGUF's rope_freqs tensor: llama.cpp's form of llama3 scaling); () = none.
    rope_freq_divisors: tuple[float, ...] = ()
    # How the model executes, not what it computes (layers.EXECUTION_FIELDS; not in Hugging Face's config.json):
    scan_layers: bool = True  # the layers as one compiled loop body (False: unrolled; the same parameters)
    remat: str = "none"  # rematerialisation of each layer in the backward pass, a layers.REMAT_POLICIES key
    attention: str = "xla"  # a layers.ATTENTION implementation ("cudnn" on NVIDIA GPUs, "chunked" for long T)
    attention_chunk: int = 512  # query rows per block of the "chunked" attention

    def __post_init__(self):
        layers.check_execution("Decoder", self)
        if self.quad_head and self.tie_word_embeddings:
            raise SentcompError("quad_head=True needs untied output embeddings (tie_word_embeddings=False).")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SentcompError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)."
            )
        if self.fused_qkv and self.num_key_value_heads != self.num_attention_heads:
            raise SentcompError("fused_qkv (GPT-NeoX's query_key_value) needs as many key/value heads as query heads.")
        for field, allowed in (("norm", NORMS), ("mlp", MLPS), ("hidden_act", tuple(layers.ACTIVATIONS))):
            if getattr(self, field) not in allowed:
                raise SentcompError(f"{field}={getattr(self, field)!r} is not supported; choose one of {allowed}.")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise SentcompError(
                f"The rotated dims of a head, partial_rotary_factor·head_dim = {self.partial_rotary_factor:g}·"
                f"{self.head_dim}, must be a positive even number."
            )
        if self.rope_type not in ROPE_TYPES:
            raise SentcompError(
                f"Rotary scaling type {self.rope_type!r} is not implemented in sentcomp; it implements {ROPE_TYPES}. "
                "Use a model with one of those."
            )
        if self.rope_type == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise SentcompError("llama3 rope scaling needs low_freq_factor < high_freq_factor.")
        if self.rope_freq_divisors and (
            len(self.rope_freq_divisors) != self.rotary_dim // 2 or min(self.rope_freq_divisors) <= 0
        ):
            raise SentcompError(
                f"rope_freq_divisors needs head_dim/2 = {self.rotary_dim // 2} positive values, got "
                f"{len(self.rope_freq_divisors)} (min {min(self.rope_freq_divisors):g}); check the GGUF's "
                "rope_freqs tensor."
            )
        if self.rope_freq_divisors and self.rope_type != "default":
            raise SentcompError(
                "rope_freq_divisors already encode the rotary scaling; rope_type must be 'default', got "
                f"{self.rope_type!r}."
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise SentcompError(f"sliding_window must be ≥ 1 (or None), got {self.sliding_window}.")
        if self.layer_types and (
            len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES)
        ):
            raise SentcompError(
                f"layer_types needs one of {LAYER_TYPES} per layer ({self.num_hidden_layers}), got {self.layer_types}."
            )

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated dims of each head, ``int(partial_rotary_factor · head_dim)`` (as Hugging Face rounds it)."""
        return int(self.head_dim * self.partial_rotary_factor)


# ------------------------------------------------------------------------- reading Hugging Face configs


def hf_rope_fields(hf_config: Mapping[str, Any], family: str, default_theta: float = 10000.0,
                   default_partial: float = 1.0) -> dict[str, Any]:
    """The :class:`DecoderConfig` rotary fields of a Hugging Face config (``rope_parameters`` of transformers 5,
    or ``rope_scaling`` + ``rope_theta`` of transformers 4). The scaling type is checked by DecoderConfig (only
    ``default``, ``linear``, ``llama3``); per-layer-type rotary parameters are refused here."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    if any(isinstance(value, Mapping) for value in rope.values()):
        raise SentcompError(f"{family} config: per-layer-type rope_parameters ({sorted(rope)}) are not supported.")
    return dict(
        rope_theta=float(rope.get("rope_theta", hf_config.get("rope_theta", default_theta))),
        partial_rotary_factor=float(
            rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", default_partial))
        ),
        rope_type=rope.get("rope_type", rope.get("type", "default")),
        **{f"rope_{key}": rope[key] for key in ROPE_SCALING_KEYS if key in rope},
    )


def refuse_options(hf_config: Mapping[str, Any], family: str, refused: Mapping[str, str]) -> None:
    """A clear error naming every ``refused`` option (``{config key: what it is}``) the config sets (present and
    neither None nor false)."""
    found = [f"{key}={hf_config[key]!r} ({what})" for key, what in refused.items() if hf_config.get(key)]
    if found:
        raise SentcompError(f"{family} config: sentcomp does not implement " + "; ".join(found) + ".")


def llama_style_config(hf_config: Mapping[str, Any], family: str, **fields) -> DecoderConfig:
    """A :class:`DecoderConfig` from the keys Llama-style configs share (Llama, Qwen2, Mistral, Gemma: sizes, GQA
    heads, ``head_dim``, ``rms_norm_eps``, ``hidden_act``, ``tie_word_embeddings``, rotary parameters), with the
    family's own ``fields`` on top. Partial rotary is refused (these families rotate whole heads)."""
    try:
        heads = hf_config["num_attention_heads"]
        rope = hf_rope_fields(hf_config, family)
        if rope["partial_rotary_factor"] != 1.0:
            raise SentcompError(f"{family} config: partial_rotary_factor={rope['partial_rotary_factor']} is not "
                                f"supported ({family} rotates whole heads).")
        values = dict(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_hidden_layers=hf_config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
            head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
            max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
            norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            hidden_act=hf_config.get("hidden_act", "silu"),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            **rope,
        )
    except KeyError as error:
        raise SentcompError(f"{family} config is missing the key {error.args[0]!r}.") from None
    return DecoderConfig(**{**values, **fields})


def hf_rope_parameters(c: DecoderConfig) -> dict[str, Any]:
    """Hugging Face's ``rope_parameters`` (transformers 5) for ``c`` (inverse of :func:`hf_rope_fields`)."""
    if c.rope_freq_divisors:
        raise SentcompError("rope_freq_divisors (a GGUF's rope_freqs tensor) have no Hugging Face config form; "
                            "give the model's llama3 rope parameters instead to export it.")
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = c.partial_rotary_factor
    if c.rope_type == "linear":
        rope["factor"] = c.rope_factor
    elif c.rope_type == "llama3":
        rope.update({key: getattr(c, f"rope_{key}") for key in ROPE_SCALING_KEYS})
    return rope


def llama_style_hf_config(c: DecoderConfig) -> dict[str, Any]:
    """The Hugging Face config keys Llama-style families share (inverse of :func:`llama_style_config`)."""
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps, hidden_act=c.hidden_act,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=hf_rope_parameters(c),
    )


# ----------------------------------------------------------------------------------------------- the network


def rotary_inverse_frequencies(c: DecoderConfig) -> np.ndarray:
    """The rotary frequencies ``ω [rotary_dim/2]``: ``ω_i = θ^(−2i/rotary_dim)``, rescaled by ``c.rope_type``.

    ``linear``: ``ω/factor``. ``llama3`` (Llama 3.1): with wavelength ``λ = 2π/ω`` and original context ``L``,
    ``ω/factor`` where ``λ > L/low_freq_factor``, ``ω`` where ``λ < L/high_freq_factor``, and in between
    ``(1 − s)·ω/factor + s·ω`` with ``s = (L/λ − low_freq_factor)/(high_freq_factor − low_freq_factor)``.
    ``rope_freq_divisors`` (a GGUF's ``rope_freqs`` tensor ``f``, as llama.cpp applies it): ``ω_i/f_i``.
    """
    dim = c.rotary_dim
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if c.rope_type == "linear":
        return inv_freq / c.rope_factor
    if c.rope_type == "llama3":
        context, low, high = c.rope_original_max_position_embeddings, c.rope_low_freq_factor, c.rope_high_freq_factor
        wavelength = 2 * np.pi / inv_freq
        smooth = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
        return (1.0 - smooth) * inv_freq / c.rope_factor + smooth * inv_freq
    if c.rope_freq_divisors:
        return inv_freq / np.asarray(c.rope_freq_divisors, np.float64)
    return inv_freq


def attention_layer_types(c: DecoderConfig) -> tuple[str, ...]:
    """Each layer's attention, ``"full_attention"`` or ``"sliding_attention"``: ``c.layer_types`` if given, else
    every layer sliding if ``c.sliding_window`` is set, full if not."""
    if c.layer_types:
        return c.layer_types
    return ("sliding_attention" if c.sliding_window is not None else "full_attention",) * c.num_hidden_layers


def layer_windows(c: DecoderConfig) -> np.ndarray:
    """Each layer's attention window ``[num_hidden_layers]`` (int32): ``sliding_window`` on the sliding layers, on
    the others a window longer than any sequence (int32's largest value)."""
    unlimited = np.iinfo(np.int32).max
    return np.array([c.sliding_window if c.sliding_window is not None and kind == "sliding_attention" else unlimited
                     for kind in attention_layer_types(c)], np.int32)


def _norm(c: DecoderConfig, name: str) -> nn.Module:
    if c.norm == "layer":
        return layers.layer_norm(c.norm_eps, name)
    return layers.RMSNorm(c.norm_eps, offset=1.0 if c.norm == "rms_plus_one" else 0.0, name=name)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings: ``x [B, T, d]`` -> ``[B, T, d]``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, cos, sin, attention_mask, window, past=None):
        """``window``: this layer's sliding window in real tokens (None: full causal attention). ``past``: this
        layer's cached ``(keys, values)`` ``[B or 1, P, kv_heads, head_dim]`` of ``P`` earlier positions that
        ``x`` continues (``attention_mask [B, P + T]`` then covers both). Returns the output and this call's
        keys (after rotary) and values, ``[B, T, kv_heads, head_dim]`` each."""
        c = self.config
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if c.fused_qkv:  # per head [q; k; v] (GPT-NeoX's query_key_value)
            qkv = nn.Dense(3 * heads * head_dim, use_bias=c.qkv_bias, name="qkv_proj")(x)
            q, k, v = jnp.split(qkv.reshape(batch, length, heads, 3 * head_dim), 3, axis=-1)
        else:
            q, k, v = (nn.Dense(n * head_dim, use_bias=c.qkv_bias, name=name)(x).reshape(batch, length, n, head_dim)
                       for n, name in ((heads, "q_proj"), (kv_heads, "k_proj"), (kv_heads, "v_proj")))
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
        if past is None:
            out = layers.self_attention(q, k, v, attention_mask, scale=head_dim**-0.5, causal=True, window=window,
                                        implementation=c.attention, chunk=c.attention_chunk)
        else:
            every_k, every_v = (jnp.concatenate([layers.broadcast_rows(cached, batch), new], axis=1)
                                for cached, new in zip(past, (k, v)))
            out = layers.attend_continuation(q, every_k, every_v, attention_mask, scale=head_dim**-0.5, window=window)
        return nn.Dense(c.hidden_size, use_bias=c.output_bias, name="o_proj")(out), (k, v)


class MLP(nn.Module):
    """``W_down(act(W_gate x) ⊙ W_up x)`` (gated) or ``W_down act(W_up x)`` (plain)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = layers.ACTIVATIONS[c.hidden_act]
        up = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="up_proj")(x)
        if c.mlp == "gated":
            inner = act(nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="gate_proj")(x)) * up
        else:
            inner = act(up)
        return nn.Dense(c.hidden_size, use_bias=c.mlp_bias, name="down_proj")(inner)


class DecoderLayer(nn.Module):
    """One pre-norm block; signature ``(carry, per_layer) -> (carry, kv)`` for the layer stack. ``per_layer``:
    this layer's entry of :func:`layer_windows`, or ``(window, cached keys, cached values)`` when continuing a
    :class:`layers.KVCache`; ``kv``: this call's ``(keys, values)`` if ``keep_kv``, else None."""

    config: DecoderConfig
    keep_kv: bool = False

    @nn.compact
    def __call__(self, carry, per_layer):
        x, cos, sin, attention_mask = carry
        c = self.config
        window, *past = per_layer if isinstance(per_layer, tuple) else (per_layer,)
        window = window if c.sliding_window is not None else None  # no window: no position arithmetic at all
        attention, kv = Attention(c, name="self_attn")(_norm(c, "input_layernorm")(x), cos, sin, attention_mask,
                                                       window, tuple(past) or None)
        if c.parallel_residual:
            out = x + attention + MLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x))
        else:
            out = x + attention
            out = out + MLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(out))
        return (out, cos, sin, attention_mask), kv if self.keep_kv else None  # residual: the parameters' dtype


class DecoderModel(nn.Module):
    """Token ids ``[B, T]`` + mask ``[B, T]`` -> final-norm hidden states ``[B, T, d]`` (then the Quad head's
    output, if any). Parameters: see the module docstring (Dense kernels are ``[in, out]``; ``lm_head [V, d]``
    has rows φ_w and is not used in the forward pass).

    With ``cache`` (a :class:`layers.KVCache` of ``P`` earlier positions), the tokens continue that sequence: the
    hidden states are those the whole sequence would give at these positions. With ``keep_kv``, returns
    ``(hidden, cache)``, the cache now covering these tokens too (a new one without ``cache``)."""

    config: DecoderConfig
    keep_kv: bool = False

    @nn.compact
    def __call__(self, token_ids, attention_mask, cache: layers.KVCache | None = None):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        if not c.tie_word_embeddings:
            self.param("lm_head", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size), jnp.float32)
        x = embed(token_ids)
        if c.scale_embeddings:  # in the embeddings' dtype, as Hugging Face's Gemma
            x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)
        windows = jnp.asarray(layer_windows(c))
        every_mask = attention_mask
        per_layer: jax.Array | tuple[jax.Array, jax.Array, jax.Array] = windows  # each layer's scanned input
        if cache is not None:  # the keys cover the cached positions, then these
            every_mask = jnp.concatenate([layers.broadcast_rows(cache.mask, token_ids.shape[0]).astype(
                attention_mask.dtype), attention_mask], axis=1)
            per_layer = (windows, cache.keys, cache.values)
        position = layers.positions(every_mask)[:, every_mask.shape[1] - token_ids.shape[1]:]
        cos, sin = layers.rotary_cos_sin(position, rotary_inverse_frequencies(c))
        decoder = layers.layer_stack(DecoderLayer, c, c.num_hidden_layers, name="layers", keep_kv=self.keep_kv)
        (x, *_), kv = decoder((x, cos, sin, every_mask), per_layer)
        x = _norm(c, "norm")(x)
        if c.quad_head:
            x = layers.quad_head(c.hidden_size)(x)
        if not self.keep_kv:
            return x
        keys, values = kv  # each [L, B, T, kv_heads, head_dim]
        if cache is None:
            return x, layers.KVCache(keys, values, attention_mask)
        return x, cache.extended(keys, values, attention_mask)


# ------------------------------------------------------------------------------------ the sentcomp view
# (The casts: flax types Module.apply's result as output | (output, variables); without mutable= it is the
# output alone.)


def hidden_fn(config: DecoderConfig, params, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Features ``f(s)`` at every position, ``[B, T, d]``: the final norm's output, or the Quad head's output."""
    layers.check_length(token_ids, config.max_position_embeddings, "model")
    return cast(jax.Array, DecoderModel(config).apply({"params": params}, token_ids, attention_mask))


def prefill(config: DecoderConfig, params, token_ids: jax.Array, attention_mask: jax.Array
            ) -> tuple[jax.Array, layers.KVCache]:
    """``(hidden_fn(...), cache)``: the features at every position and the :class:`layers.KVCache` of these
    tokens, which :func:`continue_hidden` (or a further ``prefill`` of a continuation, e.g. one generated token
    at a time, through ``DecoderModel(config, keep_kv=True)``) reads instead of recomputing them."""
    layers.check_length(token_ids, config.max_position_embeddings, "model")
    output = DecoderModel(config, keep_kv=True).apply({"params": params}, token_ids, attention_mask)
    return cast(tuple[jax.Array, layers.KVCache], output)


def continue_hidden(config: DecoderConfig, params, cache: layers.KVCache, token_ids: jax.Array,
                    attention_mask: jax.Array) -> jax.Array:
    """Features ``[B, T, d]`` of tokens that continue the sequence ``cache`` holds (:func:`prefill`): equal to
    the last ``T`` positions of :func:`hidden_fn` over the whole sequence (cached prefix + these tokens), at the
    cost of the ``T`` new positions only. ``cache`` rows: 1 (a prefix shared by every row) or ``B``. The cache's
    real tokens plus these must fit the model's context (the caller's to keep: the cache may hold padding,
    which takes no position)."""
    layers.check_length(token_ids, config.max_position_embeddings, "model")
    return cast(jax.Array, DecoderModel(config).apply({"params": params}, token_ids, attention_mask, cache))


def phi_fn(params) -> jax.Array:
    """Output word embeddings Φ ``[V, d]``: the untied ``params["lm_head"]`` if present, else the tied
    ``embed_tokens``."""
    return params["lm_head"] if "lm_head" in params else params["embed_tokens"]["embedding"]


def language_model(family: str, config: DecoderConfig, params, tokenizer, name: str) -> LanguageModel:
    """Parameters of :class:`DecoderModel` as the ``family``'s :class:`LanguageModel`."""
    view = layers.language_model_view(family, config, params, tokenizer, name, hidden_fn, phi_fn,
                                      config.max_position_embeddings)
    return view.replace(prefill_fn=functools.partial(prefill, config),
                        continue_fn=functools.partial(continue_hidden, config))


def init(family: str, config: DecoderConfig, rng: jax.Array | int = 0, quad_head: bool = False, tokenizer=None,
         name: str | None = None) -> LanguageModel:
    """A randomly initialised model of ``family`` (embeddings and ``lm_head`` ~ N(0, 0.02), Dense layers
    LeCun-normal, norms at the identity), e.g. for pretraining from scratch. ``quad_head=True`` gives the Quad
    architecture (extra d×d layer initialised to the identity, untied Φ). ``tokenizer``: None feeds token ids
    only."""
    config = layers.quad_config(config) if quad_head else config
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    name = name or f"{family}-random(d={config.hidden_size},L={config.num_hidden_layers},quad={config.quad_head})"
    dummy = jnp.ones((1, 2), jnp.int32)
    params = layers.init_params(DecoderModel(config), rng, dummy, dummy)
    return language_model(family, config, params, tokenizer, name)


# ----------------------------------------------------------------- the family facts (FLOPs, untying, pretraining)


def attention_shape(config: DecoderConfig) -> tuple[int, int]:
    """``(n_layer, d_attn)``: the layer count and the query heads' width ``heads × head_dim``."""
    return config.num_hidden_layers, config.num_attention_heads * config.head_dim


def untie(lm: LanguageModel) -> LanguageModel:
    """``lm`` with Φ untied: ``params["lm_head"]`` (:func:`phi_fn`) starts as a copy of the input embeddings."""
    config = dataclasses.replace(lm.config, tie_word_embeddings=False)
    return language_model(lm.family, config, {**lm.params, "lm_head": jnp.array(lm.phi)}, lm.tokenizer, lm.name)


def gated_mlp_width(d: int) -> int:
    """The default MLP width of a gated (SwiGLU/GeGLU) family: ``8·d/3`` rounded up to a multiple of 64, so that the
    gated MLP's three ``d × width`` matrices hold about as many weights as GPT-2's two ``d × 4d`` ones (1536 for
    d = 576, as SmolLM2-135M)."""
    return -(-8 * d // (3 * 64)) * 64


PRETRAIN_KEYS = ("intermediate_size", "num_key_value_heads", "rope_theta")  # config.model keys of these families


def pretrain_config(model, vocab_size: int, family: str, mlp_width: Callable[[int], int] = gated_mlp_width,
                    grouped_query: bool = True) -> dict[str, Any]:
    """Pretraining's ``config.model`` as the Hugging Face ``config.json`` keys of a decoder family:
    ``max_position_embeddings``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads`` from
    ``n_positions``, ``n_embd``, ``n_layer``, ``n_head``; ``intermediate_size`` (0: ``mlp_width(n_embd)``),
    ``num_key_value_heads`` (0: ``n_head``, plain multi-head attention; a family without ``grouped_query``
    refuses others), ``rope_theta`` (absent: the family's default, 10000); the family's own defaults fill the
    rest (e.g. Gemma's ``sqrt(d)``-scaled embeddings)."""
    kv_heads = model.get("num_key_value_heads", 0) or model.n_head
    if not grouped_query and kv_heads != model.n_head:
        raise SentcompError(f"{family} has no grouped-query attention; set config.model.num_key_value_heads to 0.")
    rotary = {"rope_theta": model.rope_theta} if "rope_theta" in model else {}
    return {"vocab_size": vocab_size, "tie_word_embeddings": model.tie_word_embeddings, **rotary,
            "hidden_size": model.n_embd, "num_hidden_layers": model.n_layer, "num_attention_heads": model.n_head,
            "max_position_embeddings": model.n_positions,
            "intermediate_size": model.get("intermediate_size", 0) or mlp_width(model.n_embd),
            "num_key_value_heads": kv_heads}


def family_facts(family: str, mlp_width: Callable[[int], int] = gated_mlp_width,
                 grouped_query: bool = True) -> FamilyFacts:
    """The :class:`FamilyFacts` every decoder family shares (one parameter layout: ``embed_tokens``, untied Φ in
    ``lm_head``), with its default MLP width and whether it has grouped-query attention (named ``family`` in
    errors) for pretraining from scratch."""
    return FamilyFacts(input_embedding="embed_tokens", lookups=("embed_tokens",), attention_shape=attention_shape,
                       untied_phi="lm_head", untie=untie,
                       pretrain_config=functools.partial(pretrain_config, family=family, mlp_width=mlp_width,
                                                         grouped_query=grouped_query))


# ------------------------------------------------------------------ Hugging Face checkpoints (PyTorch names)


@dataclasses.dataclass(frozen=True)
class HFNames:
    """Where a family's Hugging Face checkpoint keeps each of our parameters: module names (a tensor is
    ``<module>.weight`` / ``<module>.bias``)."""

    embedding: str  # the input embeddings
    final_norm: str
    output: str  # the untied output embeddings Φ
    layer: str  # prefix of layer i's modules, with "{}" for i
    layer_modules: Mapping[str, str]  # our module path inside a layer -> theirs inside the layer prefix
    ignored_suffixes: tuple[str, ...] = ()  # buffers some checkpoints store (masks, rotary tables): not parameters
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # other names of a tensor -> ours' theirs


LLAMA_NAMES = HFNames(  # LlamaForCausalLM, and Qwen2, Mistral and Gemma, which use the same names
    embedding="model.embed_tokens",
    final_norm="model.norm",
    output="lm_head",
    layer="model.layers.{}.",
    layer_modules={name: name.replace("/", ".") for name in (
        "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
        "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj", "input_layernorm", "post_attention_layernorm")},
    ignored_suffixes=("rotary_emb.inv_freq",),
)
# our leaf -> (theirs, stored transposed: torch nn.Linear weights are [out, in], Flax Dense kernels [in, out])
_LEAVES = {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False),
           "embedding": ("weight", False)}


@functools.lru_cache(maxsize=16)
def param_shapes(config: DecoderConfig) -> Mapping[str, tuple[int, ...]]:
    """``{our "/"-joined parameter path: shape}`` of :class:`DecoderModel`, read-only (traced without allocating,
    once per config)."""
    dummy = jnp.ones((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: DecoderModel(config).init(jax.random.key(0), dummy, dummy)["params"])
    return MappingProxyType(
        {"/".join(keys): tuple(leaf.shape) for keys, leaf in traverse_util.flatten_dict(shapes).items()})


def hf_name_map(config: DecoderConfig, names: HFNames) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{our_path: (hf_tensor_name, hf_shape)}`` for every parameter of the model ``config`` describes, its shape
    being the one the config implies. Per-layer paths carry the layer index, ``layers/<i>/...``; the Quad head is
    stored as ``quad_head.weight`` / ``quad_head.bias`` (sentcomp's own, ``[out, in]`` like torch)."""
    top = {"embed_tokens": names.embedding, "norm": names.final_norm, layers.QUAD_HEAD: layers.QUAD_HEAD}
    out = {}
    for path, shape in param_shapes(config).items():
        if path == "lm_head":
            out[path] = (names.output + ".weight", shape)
            continue
        *modules, leaf = path.split("/")
        theirs, transposed = _LEAVES[leaf]
        if modules[0] == "layers":
            module = names.layer_modules["/".join(modules[1:])]
            for i in range(config.num_hidden_layers):
                out[f"layers/{i}/{'/'.join([*modules[1:], leaf])}"] = (
                    f"{names.layer.format(i)}{module}.{theirs}", shape[1:][::-1] if transposed else shape[1:])
        else:
            out[path] = (f"{top['/'.join(modules)]}.{theirs}", shape[::-1] if transposed else shape)
    return out


def params_from_state_dict(state: Mapping[str, np.ndarray], config: DecoderConfig, names: HFNames,
                           source: str) -> dict:
    """Our parameter pytree from a Hugging Face-named state dict, through :func:`hf_name_map` with shape checks
    (Linear weights transposed to Flax kernels, layers stacked on a leading axis). Ignored: the buffers
    ``names.ignored_suffixes`` name, and the copy of the input embeddings a tied checkpoint may store as its
    output embeddings."""
    state = {names.aliases.get(key, key): value for key, value in state.items()
             if not key.endswith(names.ignored_suffixes)}
    ignored = (names.output + ".",) if config.tie_word_embeddings else ()
    tensors = hf.assign(state, hf_name_map(config, names), source, ignored_prefixes=ignored)
    tensors = {path: value.T if path.endswith("kernel") else value for path, value in tensors.items()}
    flat = layers.stack_layer_paths(tensors, "layers", config.num_hidden_layers)  # layer i -> index i
    return traverse_util.unflatten_dict(
        {tuple(path.split("/")): jnp.asarray(value, jnp.float32) for path, value in flat.items()})


def state_dict_from_params(params, config: DecoderConfig, names: HFNames) -> dict[str, np.ndarray]:
    """The Hugging Face-named float32 state dict of our parameters (inverse of :func:`params_from_state_dict`)."""
    flat = {"/".join(keys): np.asarray(value, np.float32)
            for keys, value in traverse_util.flatten_dict(jax.device_get(params)).items()}
    state = {}
    for path, (theirs, _) in hf_name_map(config, names).items():
        value = layers.unstack_layer_path(flat, path, "layers")
        state[theirs] = np.ascontiguousarray(value.T if path.endswith("kernel") else value)
    return state


# ------------------------------------------------------------------------------- a family: load and export


@dataclasses.dataclass(frozen=True)
class Family:
    """A decoder family: its ``model_type``, Hugging Face class, config mapping both ways, and tensor names."""

    name: str  # Hugging Face's model_type, and LanguageModel.family
    architecture: str  # the transformers class of its causal LM, e.g. "LlamaForCausalLM"
    config_from_hf: Callable[[Mapping[str, Any]], DecoderConfig]
    config_to_hf: Callable[[DecoderConfig], dict[str, Any]]
    names: HFNames = LLAMA_NAMES

    def init(self, config: DecoderConfig, rng: jax.Array | int = 0, quad_head: bool = False, tokenizer=None,
             name: str | None = None) -> LanguageModel:
        """A randomly initialised model of this family (:func:`init`)."""
        return init(self.name, config, rng, quad_head, tokenizer, name)

    def from_hf(self, model_dir, config: Mapping[str, Any], **options) -> LanguageModel:
        """A model of this family from a Hugging Face directory; ``options``: ``name``, ``quad_head``,
        ``tokenizer`` (:func:`from_hf`)."""
        return from_hf(self, model_dir, config, **options)

    def save_hf(self, lm: LanguageModel, directory: str | Path) -> Path:
        """Writes ``lm`` as this family's Hugging Face checkpoint (:func:`save_hf`: a Quad head is stored for
        sentcomp only, transformers ignores it)."""
        return save_hf(self, lm, directory)


def with_padding(tokenizer):
    """The tokenizer set up for sentcomp's batches: right padding, with a pad token (EOS if it has none)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SentcompError("The tokenizer has neither a pad token nor an EOS token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def build(family: Family, state, config: DecoderConfig, tokenizer, name: str, source: str,
          quad_head: bool | None = None) -> LanguageModel:
    """A :class:`LanguageModel` from a Hugging Face-named state dict (what every loader produces).

    ``quad_head``: None keeps the checkpoint's architecture; True adds the Quad head and untied Φ
    (:func:`layers.add_quad_head`: the head starts at the identity and Φ = ``lm_head``, a copy of the embeddings if
    they were tied, so f(s) and logits are unchanged until trained); False refuses a checkpoint that has one.
    """
    if quad_head is False and config.quad_head:
        raise SentcompError(f"{source} has a Quad head; quad_head=False cannot drop it.")
    params = params_from_state_dict(state, config, family.names, source)
    if quad_head:
        params, config = layers.add_quad_head(params, config, phi="lm_head", embedding="embed_tokens")
    return language_model(family.name, config, params, with_padding(tokenizer), name)


def from_hf(family: Family, model_dir, config: Mapping[str, Any], name: str | None = None,
            quad_head: bool | None = None, tokenizer=None) -> LanguageModel:
    """A ``family`` :class:`LanguageModel` from a Hugging Face directory (``config.json``, safetensors or .bin, and
    the family's tokenizer, read by ``transformers.AutoTokenizer``). ``quad_head``: see :func:`build` (a
    checkpoint :func:`save_hf` wrote with the Quad head has it back). ``tokenizer``: use this one instead of the
    directory's. Either way the tokenizer is given a pad token (EOS if none) and right padding."""
    model_dir = Path(model_dir)
    decoder_config = family.config_from_hf(config)
    if config.get(layers.QUAD_CONFIG_KEY):
        decoder_config = layers.quad_config(decoder_config)
    state = hf.read_state_dict(model_dir)
    if tokenizer is None:
        tokenizer = hf.read_tokenizer(model_dir, ("tokenizer.json", "tokenizer_config.json"))
        if tokenizer is None:
            raise SentcompError(f"{model_dir} has no tokenizer (tokenizer.json); save one there with "
                                "tokenizer.save_pretrained, or pass tokenizer=... to load().")
    return build(family, state, decoder_config, tokenizer, name or str(model_dir), str(model_dir), quad_head)


def save_hf(family: Family, lm: LanguageModel, directory: str | Path) -> Path:
    """Writes ``lm`` as a Hugging Face checkpoint of ``family`` (``config.json``, ``model.safetensors`` in float32,
    and the tokenizer if it has one) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with the same
    logits, and :func:`sentcomp.models.load` loads back.

    A Quad head is sentcomp's own: stored as ``quad_head.weight`` ``[out, in]`` and ``quad_head.bias`` with
    ``"sentcomp_quad_head": true`` in ``config.json``; transformers ignores both (it warns of unused weights) and
    computes its logits from the final norm's output, so only sentcomp sees the Quad model's f(s).
    """
    from safetensors.numpy import save_file

    if lm.family != family.name:
        raise SentcompError(f"This save_hf writes {family.name} checkpoints; got a {lm.family!r} model.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = state_dict_from_params(lm.params, lm.config, family.names)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": family.name, "architectures": [family.architecture], **family.config_to_hf(lm.config)}
    if lm.config.quad_head:
        config[layers.QUAD_CONFIG_KEY] = True
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(directory))
    return directory
