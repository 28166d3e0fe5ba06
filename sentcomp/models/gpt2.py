"""GPT-2 in Flax, loading Hugging Face weights, seen by the rest of sentcomp as pure functions over params.

Architecture (Radford et al. 2019; HF ``GPT2Model``): token + learned position embeddings, ``n_layer`` pre-norm
blocks ``x += attn(ln_1(x)); x += mlp(ln_2(x))`` with causal multi-head self-attention, and a final LayerNorm
``ln_f``. Features ``f(s)`` are the ``ln_f`` outputs; logits are ``f(s)ᵀφ_w`` with ``Φ = wte`` (tied).

Parameters: ``wte``, ``wpe``, ``h`` (the blocks, stacked on a leading layer axis: ``h/attn/c_attn/kernel`` is
``[n_layer, d, 3d]``; HF's ``h.<i>.*`` is index i), ``ln_f``, and ``phi`` / ``quad_head`` when present. The blocks
run as one ``nn.scan`` (:func:`layers.layer_stack`): ``scan_layers=False`` unrolls the same parameters, ``remat``
rematerialises each block in the backward pass, ``attention`` picks the kernel (:func:`layers.self_attention`).
These execution fields are not written to HF configs; :func:`layers.with_execution` changes them on a loaded
model.

The paper's **Quad architecture** (``quad_head=True``, Section 6 of arXiv 2010.03648) adds one d×d linear layer
with bias after ``ln_f``, whose output is ``f(s)``, and unties Φ from ``wte``. Both live in the params pytree
(``params["quad_head"]`` and ``params["phi"]``), so training code differentiates them like any other weight.

Public API:
  - :class:`GPT2Config`, :func:`gpt2_config` (``"small"|"medium"|"large"|"xl"`` presets), :func:`config_from_hf`.
  - :func:`init(config, rng, quad_head=False)` -> randomly initialised :class:`LanguageModel`.
  - :func:`from_hf(model_dir, config, name, quad_head=None)` -> :class:`LanguageModel` with HF weights
    (``sentcomp.models.load("gpt2")`` calls it).
  - :func:`save_hf(lm, directory)`: writes ``config.json`` + ``model.safetensors`` in HF naming (loadable by
    transformers' ``GPT2LMHeadModel`` unless the model has a Quad head).
  - :func:`hidden_fn`, :func:`phi_fn`, :func:`logits_fn`: the pure functions (``lm.hidden_fn`` is
    ``functools.partial(hidden_fn, config)``); :func:`language_model(config, params, tokenizer, name)` wraps
    params in the :class:`LanguageModel` view.

The pieces every family shares (LayerNorm, attention masking, the Quad head, ...) are in
:mod:`sentcomp.models.layers`.

Padding: ``attention_mask`` marks real tokens; pad keys are never attended to. Positions count the real tokens
(``cumsum(mask) − 1``, HF's convention when generating): with right padding (sentcomp.features') they are HF's
``0..T-1``, and left padding gives the same features as no padding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sentcomp.errors import SentcompError, check_fields
from sentcomp.models import hf, layers
from sentcomp.models.base import FamilyFacts, LanguageModel
from sentcomp.models.layers import ACTIVATIONS

FAMILY = "gpt2"
LAYERS = "h"  # params["h"]: the blocks' parameters, stacked on a leading layer axis


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters (HF ``GPT2Config`` names) plus sentcomp's Quad-architecture switch."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    quad_head: bool = False  # extra d×d linear layer (with bias) after ln_f; its output is f(s)
    # How the model executes, not what it computes (layers.EXECUTION_FIELDS; not in Hugging Face's config.json):
    scan_layers: bool = True  # the blocks as one compiled loop body (False: unrolled; the same parameters)
    remat: str = "none"  # rematerialisation of each block in the backward pass, a layers.REMAT_POLICIES key
    attention: str = "xla"  # a layers.ATTENTION implementation ("cudnn" on NVIDIA GPUs, "chunked" for long T)
    attention_chunk: int = 512  # query rows per block of the "chunked" attention

    def __post_init__(self):
        layers.check_config("GPT-2", self, width="n_embd", heads="n_head", activation="activation_function")
        layers.check_execution("GPT-2", self)
        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, field) < 1:
                raise SentcompError(f"GPT-2 config: {field} must be ≥ 1, got {getattr(self, field)}.")

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS = {
    "small": dict(n_embd=768, n_layer=12, n_head=12),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "large": dict(n_embd=1280, n_layer=36, n_head=20),
    "xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


def gpt2_config(size: str | None = None, **overrides) -> GPT2Config:
    """A :class:`GPT2Config`: the shape of ``gpt2``/``-medium``/``-large``/``-xl`` (``size``), then ``overrides``."""
    if size is not None and size not in PRESETS:
        raise SentcompError(f"Unknown GPT-2 size {size!r}; choose one of {sorted(PRESETS)}.")
    check_fields(overrides, GPT2Config, "GPT-2 config")
    return GPT2Config(**{**(PRESETS[size] if size is not None else {}), **overrides})


_QUAD_KEY = layers.QUAD_CONFIG_KEY  # config.json flag of checkpoints with the Quad head (written by save_hf)


def config_from_hf(hf_config: dict[str, Any]) -> GPT2Config:
    """The :class:`GPT2Config` of a HF ``config.json`` dict.

    Keys that do not change our forward pass are ignored: dropout rates, other tasks' heads, and
    ``reorder_and_upcast_attn`` (HF's option to compute QKᵀ and the softmax in float32 under fp16 autocast; we
    always scale and mask the scores and compute the softmax in float32, and QKᵀ and attention·V in the
    parameters' dtype: float32, or bf16 with bf16 parameters; see :func:`layers.attend`).
    """
    if hf_config.get("add_cross_attention"):
        raise SentcompError(
            "GPT-2 with cross-attention (add_cross_attention=true) is not a language model; unsupported."
        )
    fields = {f.name for f in dataclasses.fields(GPT2Config)} - {"quad_head", *layers.EXECUTION_FIELDS}
    values = {key: hf_config[key] for key in fields if key in hf_config}
    return GPT2Config(**values, quad_head=bool(hf_config.get(_QUAD_KEY, False)))


def hf_config_dict(config: GPT2Config) -> dict[str, Any]:
    """The HF ``config.json`` of ``config`` (``GPT2LMHeadModel``), with sentcomp's Quad flag when set; the
    execution fields (:data:`layers.EXECUTION_FIELDS`) are not written: they are chosen where the model runs."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in ("quad_head", *layers.EXECUTION_FIELDS)}
    out = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **values}
    out.update(bos_token_id=50256, eos_token_id=50256, n_ctx=config.n_positions)
    if config.quad_head:
        out[_QUAD_KEY] = True
    return out


# ----------------------------------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array, layer_idx: jax.Array) -> jax.Array:
        """``x [B, T, d]``, ``attention_mask [B, T]``, ``layer_idx`` (a traced int: the layers are scanned) ->
        ``[B, T, d]``. Scores ``q·k · s`` with ``s = 1/sqrt(head_dim)`` (if ``scale_attn_weights``), times
        ``1/(layer_idx + 1)`` if ``scale_attn_by_inverse_layer_idx``, applied in float32."""
        cfg = self.config
        batch, length, _ = x.shape
        qkv = layers.dense(3 * cfg.n_embd, cfg.initializer_range, "c_attn")(x)
        q, k, v = (t.reshape(batch, length, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        scale: float | jax.Array = (1.0 / math.sqrt(cfg.head_dim)) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale = scale / (layer_idx + 1).astype(jnp.float32)
        out = layers.self_attention(q, k, v, attention_mask, scale=scale, causal=True, implementation=cfg.attention,
                                    chunk=cfg.attention_chunk)
        return layers.dense(cfg.n_embd, _residual_stddev(cfg), "c_proj")(out)


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = ACTIVATIONS[cfg.activation_function](layers.dense(cfg.inner_dim, cfg.initializer_range, "c_fc")(x))
        return layers.dense(cfg.n_embd, _residual_stddev(cfg), "c_proj")(x)


def _residual_stddev(cfg: GPT2Config) -> float:
    """GPT-2's init of the projections into the residual stream: N(0, 0.02) scaled by 1/√(2·n_layer)."""
    return cfg.initializer_range / math.sqrt(2 * cfg.n_layer)


class Block(nn.Module):
    """One pre-norm block; signature ``((x, attention_mask), layer_idx) -> ((x, attention_mask), None)`` for the
    layer stack (:func:`layers.layer_stack`)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], layer_idx: jax.Array):
        x, attention_mask = carry
        cfg = self.config
        normed = layers.layer_norm(cfg.layer_norm_epsilon, "ln_1")(x)
        x = x + CausalSelfAttention(cfg, name="attn")(normed, attention_mask, layer_idx)
        x = x + MLP(cfg, name="mlp")(layers.layer_norm(cfg.layer_norm_epsilon, "ln_2")(x))
        return (x, attention_mask), None


class GPT2(nn.Module):
    """Token ids ``[B, T]`` and attention mask ``[B, T]`` -> features ``f(s)`` at every position ``[B, T, d]``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        x = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, name="wte")(token_ids)
        positions = layers.positions(attention_mask)
        x = x + nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, name="wpe")(positions)
        blocks = layers.layer_stack(Block, cfg, cfg.n_layer, name=LAYERS)
        (x, _), _ = blocks((x, attention_mask), jnp.arange(cfg.n_layer))
        x = layers.layer_norm(cfg.layer_norm_epsilon, "ln_f")(x)
        if cfg.quad_head:
            x = layers.quad_head(cfg.n_embd)(x)
        if not cfg.tie_word_embeddings:
            self.param("phi", init, (cfg.vocab_size, cfg.n_embd))
        return x


def hidden_fn(config: GPT2Config, params, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Features ``f(s)`` at every position, ``[B, T, d]``: ``ln_f`` output, or the Quad head's output."""
    layers.check_length(token_ids, config.n_positions, "GPT-2")
    # the cast: flax types apply's result as output | (output, variables); without mutable= it is the output
    return cast(jax.Array, GPT2(config).apply({"params": params}, token_ids, attention_mask))


def phi_fn(params) -> jax.Array:
    """Output word embeddings Φ ``[V, d]``: the untied ``params["phi"]`` if present, else the tied ``wte``."""
    return params["phi"] if "phi" in params else params["wte"]["embedding"]


def logits_fn(config: GPT2Config, params, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Next-token logits ``f(s)ᵀφ_w`` at every position, ``[B, T, V]`` (small inputs only: it is V-wide)."""
    return jnp.einsum("btd,vd->btv", hidden_fn(config, params, token_ids, attention_mask), phi_fn(params))


def language_model(config: GPT2Config, params, tokenizer, name: str) -> LanguageModel:
    """Wraps parameters of :class:`GPT2` in the :class:`LanguageModel` view."""
    return layers.language_model_view(FAMILY, config, params, tokenizer, name, hidden_fn, phi_fn, config.n_positions)


def _keep_quad(config: GPT2Config, quad_head: bool | None) -> None:
    """``quad_head=False`` asks for a model without the Quad head: refused if ``config`` has one."""
    if quad_head is False and config.quad_head:
        raise SentcompError("This checkpoint has a Quad head; quad_head=False cannot drop it.")


def init(config: GPT2Config, rng: jax.Array | int = 0, quad_head: bool = False, tokenizer=None,
         name: str | None = None) -> LanguageModel:
    """A randomly initialised GPT-2 (GPT-2's init: N(0, 0.02), residual projections scaled by 1/√(2·n_layer)).

    ``quad_head=True`` gives the Quad architecture (head initialised to the identity, untied Φ ~ N(0, 0.02)).
    ``tokenizer`` defaults to the real GPT-2 tokenizer.
    """
    from sentcomp.models.tokenizers import gpt2_tokenizer

    _keep_quad(config, quad_head)
    config = layers.quad_config(config) if quad_head else config
    tokenizer = tokenizer if tokenizer is not None else gpt2_tokenizer()
    name = name or f"gpt2-random(d={config.n_embd},L={config.n_layer},quad={config.quad_head})"
    layers.check_tokenizer_fits(tokenizer, config.vocab_size, name)  # before the (large) parameters exist
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    dummy = jnp.zeros((1, 1), jnp.int32)
    params = layers.init_params(GPT2(config), rng, dummy, jnp.ones_like(dummy))
    return language_model(config, params, tokenizer, name)


# -------------------------------------------------------------------------------- HF checkpoint name map

_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers stored by older checkpoints
_TRANSPOSED = {"quad_head/kernel"}  # stored as torch nn.Linear [out, in]; Flax Dense kernels are [in, out]


def hf_name_map(config: GPT2Config, prefix: str = "transformer.") -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{our "/"-joined param path: (HF tensor name, expected HF shape)}``.

    GPT-2's Conv1D weights are already ``[in, out]`` like Flax Dense kernels; ``lm_head.weight`` is ``[V, d]``
    like Φ. ``prefix`` is ``"transformer."`` for ``GPT2LMHeadModel`` checkpoints, ``""`` for ``GPT2Model``'s.
    Block ``i``'s paths are ``h/<i>/...``: index ``i`` of the stacked ``params["h"]``
    (:func:`layers.stack_layer_paths`).
    """
    d, inner = config.n_embd, config.inner_dim
    names = {
        "wte/embedding": ("wte.weight", (config.vocab_size, d)),
        "wpe/embedding": ("wpe.weight", (config.n_positions, d)),
        "ln_f/scale": ("ln_f.weight", (d,)),
        "ln_f/bias": ("ln_f.bias", (d,)),
    }
    for i in range(config.n_layer):
        layer = {
            "ln_1/scale": ("ln_1.weight", (d,)),
            "ln_1/bias": ("ln_1.bias", (d,)),
            "attn/c_attn/kernel": ("attn.c_attn.weight", (d, 3 * d)),
            "attn/c_attn/bias": ("attn.c_attn.bias", (3 * d,)),
            "attn/c_proj/kernel": ("attn.c_proj.weight", (d, d)),
            "attn/c_proj/bias": ("attn.c_proj.bias", (d,)),
            "ln_2/scale": ("ln_2.weight", (d,)),
            "ln_2/bias": ("ln_2.bias", (d,)),
            "mlp/c_fc/kernel": ("mlp.c_fc.weight", (d, inner)),
            "mlp/c_fc/bias": ("mlp.c_fc.bias", (inner,)),
            "mlp/c_proj/kernel": ("mlp.c_proj.weight", (inner, d)),
            "mlp/c_proj/bias": ("mlp.c_proj.bias", (d,)),
        }
        names.update({f"{LAYERS}/{i}/{ours}": (f"h.{i}.{theirs}", shape) for ours, (theirs, shape) in layer.items()})
    names = {ours: (prefix + theirs, shape) for ours, (theirs, shape) in names.items()}
    if config.quad_head:
        names["quad_head/kernel"] = ("quad_head.weight", (d, d))
        names["quad_head/bias"] = ("quad_head.bias", (d,))
    if not config.tie_word_embeddings:
        names["phi"] = ("lm_head.weight", (config.vocab_size, d))
    return names


def _checkpoint_prefix(state: dict[str, np.ndarray]) -> str:
    return "transformer." if any(name.startswith("transformer.") for name in state) else ""


def params_from_state_dict(state: dict[str, np.ndarray], config: GPT2Config, source: str) -> dict:
    """Our params pytree from a HF state dict, through the explicit name map with shape checks."""
    # A tied checkpoint may still store lm_head.weight (equal to wte): it is redundant, not an extra tensor.
    state = dict(state)
    if config.tie_word_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    ignored = tuple(name for name in state if name.endswith(_BUFFER_SUFFIXES))
    flat = hf.assign(state, hf_name_map(config, _checkpoint_prefix(state)), source, ignored_prefixes=ignored)
    flat = {k: (v.T if k in _TRANSPOSED else v) for k, v in flat.items()}
    flat = layers.stack_layer_paths(flat, LAYERS, config.n_layer)  # block i -> index i of params["h"]
    return traverse_util.unflatten_dict({tuple(k.split("/")): jax.device_put(v) for k, v in flat.items()})


def _tokenizer_for(model_dir: Path):
    """The tokenizer saved with the checkpoint if any, else the real GPT-2 tokenizer (offline package)."""
    from sentcomp.models.tokenizers import gpt2_tokenizer

    tokenizer = hf.read_tokenizer(model_dir, ("tokenizer.json", "vocab.json"))
    return tokenizer if tokenizer is not None else gpt2_tokenizer()


def from_hf(model_dir: str | Path, config: dict[str, Any], name: str | None = None,
            quad_head: bool | None = None, tokenizer=None) -> LanguageModel:
    """A GPT-2 with the weights of a HF-format directory (``config.json`` + safetensors or pytorch_model.bin).

    ``quad_head``: None keeps the checkpoint's architecture; True adds the Quad head and untied Φ
    (:func:`layers.add_quad_head`: a plain checkpoint starts with the head at the identity and Φ as a copy of
    ``wte``, so f(s) and logits are unchanged until trained).
    ``tokenizer``: default is the checkpoint's own tokenizer files, else the real GPT-2 tokenizer.
    """
    model_dir = Path(model_dir)
    gpt2 = config_from_hf(config)
    _keep_quad(gpt2, quad_head)
    params = params_from_state_dict(hf.read_state_dict(model_dir), gpt2, str(model_dir))
    if quad_head:
        params, gpt2 = layers.add_quad_head(params, gpt2, phi="phi", embedding="wte")
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_for(model_dir)
    return language_model(gpt2, params, tokenizer, name or str(model_dir))


def save_hf(lm: LanguageModel, directory: str | Path) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` with HF ``GPT2LMHeadModel`` names (inverse of from_hf)."""
    from safetensors.numpy import save_file

    if lm.family != FAMILY:
        raise SentcompError(f"save_hf writes GPT-2 checkpoints; got a {lm.family!r} model.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(lm.params).items()}
    state = {}
    for ours, (theirs, _) in hf_name_map(lm.config).items():
        value = layers.unstack_layer_path(flat, ours, LAYERS)
        state[theirs] = value.T if ours in _TRANSPOSED else value
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config_dict(lm.config), indent=2))
    return directory


def untie(lm: LanguageModel) -> LanguageModel:
    """A copy with Φ untied from ``wte`` (``params["phi"]`` starts as a copy of it)."""
    config = dataclasses.replace(lm.config, tie_word_embeddings=False)
    params = {**lm.params, "phi": jnp.array(lm.params["wte"]["embedding"])}
    return language_model(config, params, lm.tokenizer, lm.name)


def attention_shape(config: GPT2Config) -> tuple[int, int]:
    """``(n_layer, d_attn)``: GPT-2's heads together are as wide as the model, ``n_embd``."""
    return config.n_layer, config.n_embd


PRETRAIN_KEYS = ("n_positions", "n_embd", "n_layer", "n_head")  # config.model keys that are GPT-2 config keys
ROTARY_KEYS = ("intermediate_size", "num_key_value_heads", "rope_theta")  # config.model keys of rotary families


def pretrain_config(model, vocab_size: int) -> dict[str, Any]:
    """Pretraining's ``config.model`` as GPT-2 ``config.json`` keys: ``n_positions``, ``n_embd``, ``n_layer``,
    ``n_head`` as they are; a rotary family's keys (:data:`ROTARY_KEYS`) are refused."""
    misplaced = [key for key in ROTARY_KEYS if key in model]
    if misplaced:
        raise SentcompError(f"config.model.{misplaced[0]} applies to rotary families (e.g. family=llama), not "
                            "GPT-2; remove it or change config.model.family.")
    return {"vocab_size": vocab_size, "tie_word_embeddings": model.tie_word_embeddings,
            **{key: model[key] for key in PRETRAIN_KEYS}}


# What code outside the family needs to know (sentcomp.models.facts): wte and wpe are lookups, Φ is wte or phi
FACTS = FamilyFacts(input_embedding="wte", lookups=("wte", "wpe"), attention_shape=attention_shape, untied_phi="phi",
                    untie=untie, pretrain_config=pretrain_config)

