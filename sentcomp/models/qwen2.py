"""Qwen2 / Qwen2.5 causal LMs: a Llama (:mod:`sentcomp.models.llama`) with biases on the q/k/v projections (none
on the output projection or the MLP), tied or untied output embeddings, and optionally sliding-window attention
on the layers from ``max_window_layers`` on (``use_sliding_window``; or per layer, ``layer_types``). Everything
else is the shared rotary decoder (:mod:`sentcomp.models.decoder`); the tokenizer is the directory's own
(``Qwen2Tokenizer``, byte-level BPE).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sentcomp.models import decoder
from sentcomp.models.decoder import DecoderConfig

FAMILY = "qwen2"


def config_from_hf(config: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face ``Qwen2Config`` dict. The sliding window applies only with
    ``use_sliding_window``, on the layers ``layer_types`` marks ``sliding_attention`` (default: layers ≥
    ``max_window_layers``), as transformers does."""
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    layer_types = config.get("layer_types") or [
        "sliding_attention" if window is not None and i >= config.get("max_window_layers", 28) else "full_attention"
        for i in range(config.get("num_hidden_layers", 0))
    ]
    return decoder.llama_style_config(config, "Qwen2", qkv_bias=True, sliding_window=window,
                                      layer_types=tuple(layer_types))


def hf_config_dict(c: DecoderConfig) -> dict[str, Any]:
    """The Hugging Face ``Qwen2Config`` keys of ``c`` (inverse of :func:`config_from_hf`)."""
    window = {"use_sliding_window": c.sliding_window is not None, "sliding_window": c.sliding_window,
              "layer_types": list(decoder.attention_layer_types(c))}
    return {**decoder.llama_style_hf_config(c), **window}


SPEC = decoder.Family(FAMILY, "Qwen2ForCausalLM", config_from_hf, hf_config_dict)

# The family's entry points (sentcomp.models.load dispatches to from_hf) and facts (sentcomp.models.facts)
init, from_hf, save_hf = SPEC.init, SPEC.from_hf, SPEC.save_hf
FACTS = decoder.family_facts("Qwen2")
