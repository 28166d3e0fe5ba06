"""Llama-architecture causal LMs in Flax (Llama 2/3-style, SmolLM2, TinyLlama), seen as pure functions.

One decoder block, for hidden states ``x [B, T, d]`` (Touvron et al. 2023):

    x ← x + Attn(RMSNorm(x)),   x ← x + W_down( SiLU(W_gate x̂) ⊙ W_up x̂ ),  x̂ = RMSNorm(x)
    RMSNorm(x) = g ⊙ x / sqrt(mean(x²) + ε)

Attention is causal, masks padded keys, and uses grouped-query attention: ``num_heads`` query heads share
``num_kv_heads`` key/value heads (``num_heads / num_kv_heads`` queries per group). Queries and keys are rotated
by rotary position embeddings in Hugging Face's half-split convention: for a head vector ``x = [x₁, x₂]``
(two halves), ``rope(x, p) = x ⊙ cos(p·ω) + [−x₂, x₁] ⊙ sin(p·ω)`` with ``ω_i = base^(−2i/head_dim)``
(repeated over both halves), optionally rescaled (``linear``, or Llama 3.1's ``llama3``:
:func:`rotary_inverse_frequencies`). Positions count the real tokens (``cumsum(mask) − 1``), so right padding changes
nothing, and left padding gives the same features as no padding.

The sentcomp view (``sentcomp.models.base.LanguageModel``):
- ``hidden_fn(params, ids, mask) -> [B, T, d]``: the final RMSNorm output at every position, f(s);
- ``phi_fn(params) -> [V, d]``: the output embeddings Φ: ``lm_head`` if untied, else the token embeddings.
The blocks are one ``nn.scan`` over stacked layer parameters (leading axis = layer), so a 30-layer model
compiles as fast as a 1-layer one.

Loading: ``sentcomp.models.load(dir_or_hub_name)`` for Hugging Face checkpoints (``from_hf`` here);
``load("smollm2-135m")`` or ``load("x.gguf")`` for GGUF files (``sentcomp.models.gguf_loader``), which map to
the same Hugging Face tensor names and then use ``build`` (``params_from_state_dict``) below. Random models:
``init``. The paper's Quad architecture (``quad_head=True``): one d×d linear layer with bias after the final
norm, whose output is f(s), and Φ untied (``params["quad_head"]`` and ``params["lm_head"]``), built as in every
family by :mod:`sentcomp.models.layers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sentcomp.errors import SentcompError
from sentcomp.models import hf, layers
from sentcomp.models.base import LanguageModel

FAMILY = "llama"
ROPE_TYPES = ("default", "linear", "llama3")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")  # HF's


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-architecture LM (names follow Hugging Face's ``LlamaConfig``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    quad_head: bool = False  # the paper's Quad architecture: a d×d linear layer (with bias) after the final norm
    # Rotary frequency scaling (Hugging Face's rope_parameters): "default" (none), "linear" or "llama3".
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3 only
    # Per-frequency divisors of ω (GGUF's rope_freqs tensor: llama.cpp's form of llama3 scaling); () = none.
    rope_freq_divisors: tuple[float, ...] = ()

    def __post_init__(self):
        if self.quad_head and self.tie_word_embeddings:
            raise SentcompError("quad_head=True needs untied output embeddings (tie_word_embeddings=False).")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SentcompError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)."
            )
        if self.head_dim % 2:
            raise SentcompError(f"head_dim={self.head_dim} must be even for rotary position embeddings.")
        if self.rope_type not in ROPE_TYPES:
            raise SentcompError(
                f"Rotary scaling type {self.rope_type!r} is not implemented in sentcomp's Llama; it implements "
                f"{ROPE_TYPES}. Use a model with one of those."
            )
        if self.rope_type == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise SentcompError("llama3 rope scaling needs low_freq_factor < high_freq_factor.")
        if self.rope_freq_divisors and (
            len(self.rope_freq_divisors) != self.head_dim // 2 or min(self.rope_freq_divisors) <= 0
        ):
            raise SentcompError(
                f"rope_freq_divisors needs head_dim/2 = {self.head_dim // 2} positive values, got "
                f"{len(self.rope_freq_divisors)} (min {min(self.rope_freq_divisors):g}); check the GGUF's "
                "rope_freqs tensor."
            )
        if self.rope_freq_divisors and self.rope_type != "default":
            raise SentcompError(
                "rope_freq_divisors already encode the rotary scaling; rope_type must be 'default', got "
                f"{self.rope_type!r}."
            )

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads


def config_from_hf(config: Mapping[str, Any]) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict (transformers 4 or 5 style).

    Rotary scaling: ``default``, ``linear`` and Llama 3.1's ``llama3``; other variants (``yarn``, ``dynamic``,
    ...) are rejected rather than silently ignored.
    """
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise SentcompError(f"hidden_act={activation!r}: sentcomp's Llama implements the SwiGLU MLP (silu) only.")
    try:
        heads = config["num_attention_heads"]
        return LlamaConfig(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope_type=rope.get("rope_type", rope.get("type", "default")),  # checked by LlamaConfig
            **{f"rope_{key}": rope[key] for key in ROPE_SCALING_KEYS if key in rope},
        )
    except KeyError as error:
        raise SentcompError(f"Llama config is missing the key {error.args[0]!r}.") from None


# ----------------------------------------------------------------------------------------------- the network


def rotary_inverse_frequencies(c: LlamaConfig) -> np.ndarray:
    """The rotary frequencies ``ω [head_dim/2]``: ``ω_i = θ^(−2i/head_dim)``, rescaled by ``c.rope_type``.

    ``linear``: ``ω/factor``. ``llama3`` (Llama 3.1): with wavelength ``λ = 2π/ω`` and original context ``L``,
    ``ω/factor`` where ``λ > L/low_freq_factor``, ``ω`` where ``λ < L/high_freq_factor``, and in between
    ``(1 − s)·ω/factor + s·ω`` with ``s = (L/λ − low_freq_factor)/(high_freq_factor − low_freq_factor)``.
    ``rope_freq_divisors`` (a GGUF's ``rope_freqs`` tensor ``f``, as llama.cpp applies it): ``ω_i/f_i``.
    """
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
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


def rotary_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``cos(p·ω), sin(p·ω)``, shape ``positions.shape + (head_dim,)``, ω repeated over both halves of the head."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x ⊙ cos + [−x₂, x₁] ⊙ sin`` for ``x [B, T, heads, head_dim]`` and ``cos, sin [B, T, head_dim]``,
    computed in float32 (the tables' dtype) and returned in ``x``'s dtype (bf16 for a bf16 model)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def attention_bias(attention_mask: jax.Array) -> jax.Array:
    """Additive bias ``[B, 1, 1, T, T]``: 0 where query t may see key s (s ≤ t and s is a real token), else a
    large negative number (finite, so a query with no visible key gives a uniform average, not NaN)."""
    visible = layers.visible_keys(attention_mask, causal=True)
    return jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]


class RMSNorm(nn.Module):
    """``g ⊙ x / sqrt(mean(x²) + ε)``, computed in float32 and returned in ``x``'s dtype (a bf16 model's
    activations stay bf16)."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        dtype, x = x.dtype, x.astype(jnp.float32)
        return (scale * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))).astype(dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, bias):
        c = self.config
        batch, length, _ = x.shape
        dense = lambda features, name: nn.Dense(features, use_bias=c.attention_bias, name=name)  # noqa: E731
        q = dense(c.num_attention_heads * c.head_dim, "q_proj")(x).reshape(batch, length, -1, c.head_dim)
        k = dense(c.num_key_value_heads * c.head_dim, "k_proj")(x).reshape(batch, length, -1, c.head_dim)
        v = dense(c.num_key_value_heads * c.head_dim, "v_proj")(x).reshape(batch, length, -1, c.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Query head h = group g of KV head k, h = k·kv_groups + g (Hugging Face's repeat_kv order).
        q = q.reshape(batch, length, c.num_key_value_heads, c.kv_groups, c.head_dim)
        # QKᵀ and weights·V run in the parameters' dtype; scaling, mask and softmax in float32 (like bias)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / np.sqrt(c.head_dim) + bias
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(batch, length, -1)
        return nn.Dense(c.hidden_size, use_bias=c.attention_bias, name="o_proj")(out)


class MLP(nn.Module):
    """SwiGLU: ``W_down(SiLU(W_gate x) ⊙ W_up x)``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="gate_proj")(x)
        up = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="up_proj")(x)
        return nn.Dense(c.hidden_size, use_bias=c.mlp_bias, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block; signature ``(carry, _) -> (carry, None)`` for ``nn.scan``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, _):
        stream, cos, sin, bias = carry
        c = self.config
        normed = RMSNorm(c.rms_norm_eps, name="input_layernorm")(stream)
        x = stream + Attention(c, name="self_attn")(normed, cos, sin, bias)
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
        return (x, cos, sin, bias), None  # the residual stream keeps the parameters' dtype (nn.scan checks)


class LlamaModel(nn.Module):
    """Token ids ``[B, T]`` + mask ``[B, T]`` -> final-norm hidden states ``[B, T, d]`` (then the Quad head's
    output, if any).

    Parameters: ``embed_tokens/embedding [V, d]``, ``layers/...`` stacked over layers (Dense kernels are
    ``[in, out]``), ``norm/scale [d]``, when untied ``lm_head [V, d]`` (rows φ_w, not used in the forward),
    and with ``quad_head`` a Dense ``quad_head`` (initialised to the identity).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, token_ids, attention_mask):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        if not c.tie_word_embeddings:
            self.param("lm_head", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size), jnp.float32)
        cos, sin = rotary_cos_sin(layers.positions(attention_mask), rotary_inverse_frequencies(c))
        decoder = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=c.num_hidden_layers,
        )(c, name="layers")
        (x, *_), _ = decoder((embed(token_ids), cos, sin, attention_bias(attention_mask)), None)
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        if c.quad_head:
            x = layers.quad_head(c.hidden_size)(x)
        return x


# ------------------------------------------------------------------------------------ the sentcomp view


def hidden_fn(config: LlamaConfig, params, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Features ``f(s)`` at every position, ``[B, T, d]``: the final RMSNorm output, or the Quad head's output."""
    layers.check_length(token_ids, config.max_position_embeddings, "Llama")
    return LlamaModel(config).apply({"params": params}, token_ids, attention_mask)


def phi_fn(params) -> jax.Array:
    """Output word embeddings Φ ``[V, d]``: the untied ``params["lm_head"]`` if present, else the tied
    ``embed_tokens``."""
    return params["lm_head"] if "lm_head" in params else params["embed_tokens"]["embedding"]


def language_model(config: LlamaConfig, params, tokenizer, name: str) -> LanguageModel:
    """Wraps parameters of :class:`LlamaModel` in the :class:`LanguageModel` view."""
    return layers.language_model_view(FAMILY, config, params, tokenizer, name, hidden_fn, phi_fn,
                                      config.max_position_embeddings)


def init(
    config: LlamaConfig, rng: jax.Array | int = 0, quad_head: bool = False, tokenizer=None, name: str | None = None
) -> LanguageModel:
    """A randomly initialised Llama LM (embeddings and ``lm_head`` ~ N(0, 0.02), Dense layers LeCun-normal,
    norms 1), e.g. for pretraining from scratch. ``quad_head=True`` gives the Quad architecture (extra d×d
    layer initialised to the identity, untied Φ). ``tokenizer`` is optional (None: feed token ids only)."""
    config = layers.quad_config(config) if quad_head else config
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    name = name or f"llama-random(d={config.hidden_size},L={config.num_hidden_layers},quad={config.quad_head})"
    dummy = jnp.ones((1, 2), jnp.int32)
    params = LlamaModel(config).init(rng, dummy, dummy)["params"]
    return language_model(config, params, tokenizer, name)


# ------------------------------------------------------------------ Hugging Face checkpoints (PyTorch names)

_LINEARS = {  # our module path inside a layer -> (HF name inside "model.layers.N.", [out, in] shape getter)
    "self_attn/q_proj": ("self_attn.q_proj", lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)),
    "self_attn/k_proj": ("self_attn.k_proj", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    "self_attn/v_proj": ("self_attn.v_proj", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    "self_attn/o_proj": ("self_attn.o_proj", lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    "mlp/gate_proj": ("mlp.gate_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp/up_proj": ("mlp.up_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    "mlp/down_proj": ("mlp.down_proj", lambda c: (c.hidden_size, c.intermediate_size)),
}
_NORMS = ("input_layernorm", "post_attention_layernorm")  # same names in both


def hf_name_map(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{our_path: (hf_tensor_name, hf_shape)}`` for every tensor of a Hugging Face ``LlamaForCausalLM``.

    Our paths are ``/``-joined; per-layer ones carry the layer index as ``layers/<i>/...``.
    """
    c = config
    names = {
        "embed_tokens/embedding": ("model.embed_tokens.weight", (c.vocab_size, c.hidden_size)),
        "norm/scale": ("model.norm.weight", (c.hidden_size,)),
    }
    if not c.tie_word_embeddings:
        names["lm_head"] = ("lm_head.weight", (c.vocab_size, c.hidden_size))
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for ours, (theirs, shape) in _LINEARS.items():
            names[f"layers/{i}/{ours}/kernel"] = (prefix + theirs + ".weight", shape(c))
            has_bias = c.mlp_bias if ours.startswith("mlp") else c.attention_bias
            if has_bias:
                names[f"layers/{i}/{ours}/bias"] = (prefix + theirs + ".bias", shape(c)[:1])
        for norm in _NORMS:
            names[f"layers/{i}/{norm}/scale"] = (prefix + norm + ".weight", (c.hidden_size,))
    return names


def params_from_state_dict(state: Mapping[str, np.ndarray], config: LlamaConfig, source: str) -> dict:
    """Our parameter pytree from a Hugging Face-named state dict (shape-checked; Linear weights transposed to
    Flax ``[in, out]`` kernels; layers stacked on a leading axis). Ignored: the rotary ``inv_freq`` buffers older
    checkpoints store (recomputed here), and the copy of the embeddings a tied checkpoint may hold as
    ``lm_head.weight``."""
    state = {name: value for name, value in state.items() if not name.endswith("rotary_emb.inv_freq")}
    ignored = ("lm_head.",) if config.tie_word_embeddings else ()
    tensors = hf.assign(state, hf_name_map(config), source, ignored_prefixes=ignored)
    flat = {}
    for path, value in tensors.items():
        keys = tuple(path.split("/"))
        value = value.T if path.endswith("kernel") else value
        if keys[0] == "layers":  # collect layer i's tensor at index i of the stacked one
            flat.setdefault(("layers", *keys[2:]), [None] * config.num_hidden_layers)[int(keys[1])] = value
        else:
            flat[keys] = value
    return traverse_util.unflatten_dict(
        {keys: jnp.asarray(np.stack(v) if isinstance(v, list) else v, jnp.float32) for keys, v in flat.items()}
    )


def build(state, config: LlamaConfig, tokenizer, name: str, source: str, quad_head: bool = False) -> LanguageModel:
    """A :class:`LanguageModel` from a Hugging Face-named state dict (what every loader produces).

    ``quad_head=True`` adds the Quad head and untied Φ (:func:`layers.add_quad_head`: the head starts at the
    identity and Φ = ``lm_head``, a copy of the embeddings if they were tied, so f(s) and logits are unchanged
    until trained).
    """
    params = params_from_state_dict(state, config, source)
    if quad_head:
        params, config = layers.add_quad_head(params, config, phi="lm_head", embedding="embed_tokens")
    return language_model(config, params, with_padding(tokenizer), name)


def with_padding(tokenizer):
    """The tokenizer set up for sentcomp's batches: right padding, with a pad token (EOS if it has none)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SentcompError("The tokenizer has neither a pad token nor an EOS token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _tokenizer_for(model_dir: Path):
    """The directory's Hugging Face tokenizer (``tokenizer.json``/``tokenizer_config.json``)."""
    tokenizer = hf.read_tokenizer(model_dir, ("tokenizer.json", "tokenizer_config.json"))
    if tokenizer is None:
        raise SentcompError(
            f"{model_dir} has no tokenizer (tokenizer.json); save one there with tokenizer.save_pretrained, "
            "or pass tokenizer=... to load()."
        )
    return tokenizer


def from_hf(
    model_dir, config: dict, name: str | None = None, quad_head: bool = False, tokenizer=None
) -> LanguageModel:
    """A :class:`LanguageModel` from a Hugging Face ``LlamaForCausalLM`` directory (safetensors or .bin).

    ``quad_head=True`` adds the Quad head (see :func:`build`). ``tokenizer``: use this one instead of
    the directory's. Either way the tokenizer is given a pad token (EOS if none) and right padding.
    """
    model_dir = Path(model_dir)
    state = hf.read_state_dict(model_dir)
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_for(model_dir)
    return build(state, config_from_hf(config), tokenizer, name or str(model_dir), str(model_dir), quad_head)
