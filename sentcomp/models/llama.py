"""Llama-architecture causal LMs (Llama 2/3-style, SmolLM2, TinyLlama): the shared rotary decoder
(:mod:`sentcomp.models.decoder`) with RMSNorm, a gated MLP (SwiGLU: ``W_down(SiLU(W_gate x) ⊙ W_up x)``),
grouped-query attention with optional biases (``attention_bias``, ``mlp_bias``), full rotary embeddings with
``linear`` or Llama 3.1's ``llama3`` frequency scaling, and tied or untied output embeddings.

Loading: ``sentcomp.models.load(dir_or_hub_name)`` for Hugging Face checkpoints (:func:`from_hf`);
``load("smollm2-135m")`` or ``load("x.gguf")`` for GGUF files (``sentcomp.models.gguf_loader``, which maps to the
same Hugging Face tensor names and then calls :func:`build`). Export: :func:`save_hf`. Random models:
:func:`init`. The paper's Quad architecture (``quad_head=True``): one d×d linear layer with bias after the final
norm, whose output is f(s), and Φ untied (``params["quad_head"]`` and ``params["lm_head"]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sentcomp.models import decoder
from sentcomp.models.decoder import DecoderConfig

FAMILY = "llama"
LlamaConfig = DecoderConfig  # a Llama is the shared decoder with its defaults (RMSNorm, SwiGLU, sequential)


def config_from_hf(config: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face ``LlamaConfig`` dict (transformers 4 or 5 style). Rotary
    scaling: ``default``, ``linear`` and ``llama3``; other types (``yarn``, ``dynamic``, ...) are refused."""
    bias = bool(config.get("attention_bias", False))
    return decoder.llama_style_config(config, "Llama", qkv_bias=bias, output_bias=bias,
                                      mlp_bias=bool(config.get("mlp_bias", False)),
                                      tie_word_embeddings=bool(config.get("tie_word_embeddings", True)))


def hf_config_dict(c: DecoderConfig) -> dict[str, Any]:
    """The Hugging Face ``LlamaConfig`` keys of ``c`` (inverse of :func:`config_from_hf`)."""
    return {**decoder.llama_style_hf_config(c), "attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias}


SPEC = decoder.Family(FAMILY, "LlamaForCausalLM", config_from_hf, hf_config_dict)


def build(state, config: DecoderConfig, tokenizer, name: str, source: str, quad_head: bool | None = None):
    """A Llama :class:`LanguageModel` from a Hugging Face-named state dict (:func:`decoder.build`)."""
    return decoder.build(SPEC, state, config, tokenizer, name, source, quad_head)


# The family's entry points (sentcomp.models.load dispatches to from_hf) and facts (sentcomp.models.facts)
init, from_hf, save_hf = SPEC.init, SPEC.from_hf, SPEC.save_hf
FACTS = decoder.family_facts("Llama")
