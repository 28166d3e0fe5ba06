"""Mistral causal LMs: a Llama (:mod:`sentcomp.models.llama`) without biases whose attention looks back over a
sliding window on every layer (query t sees key s only if ``t − s < sliding_window``; ``null``: full causal
attention), with ``head_dim`` free (Mistral-Nemo's is not ``d/heads``). Everything else is the shared rotary
decoder (:mod:`sentcomp.models.decoder`); the tokenizer is the directory's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sentcomp.models import decoder
from sentcomp.models.decoder import DecoderConfig

FAMILY = "mistral"
REFUSED = {"layer_types": "per-layer attention patterns: Ministral's, not Mistral's"}


def config_from_hf(config: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face ``MistralConfig`` dict."""
    decoder.refuse_options(config, "Mistral", REFUSED)
    return decoder.llama_style_config(config, "Mistral", sliding_window=config.get("sliding_window"))


def hf_config_dict(c: DecoderConfig) -> dict[str, Any]:
    """The Hugging Face ``MistralConfig`` keys of ``c`` (inverse of :func:`config_from_hf`)."""
    return {**decoder.llama_style_hf_config(c), "sliding_window": c.sliding_window}


SPEC = decoder.Family(FAMILY, "MistralForCausalLM", config_from_hf, hf_config_dict)

# The family's entry points (sentcomp.models.load dispatches to from_hf) and facts (sentcomp.models.facts)
init, from_hf, save_hf = SPEC.init, SPEC.from_hf, SPEC.save_hf
FACTS = decoder.family_facts("Mistral")
