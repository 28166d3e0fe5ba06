"""Gemma (1) causal LMs: the shared rotary decoder (:mod:`sentcomp.models.decoder`) with GeGLU
(``W_down(GELU_tanh(W_gate x) ⊙ W_up x)``), RMSNorm with gains ``1 + w`` (the checkpoint stores ``w``), input
embeddings multiplied by ``sqrt(d)``, ``head_dim`` free (Gemma-7B's 256 is not ``d/heads``), multi- or
grouped-query attention, tied output embeddings (and a large vocabulary: 256k, which sentcomp's kernels stream).
The tokenizer is the directory's own (``GemmaTokenizer``).

Gemma 2's and 3's additions (logit soft-capping, ``query_pre_attn_scalar``, alternating sliding layers,
post-norms) are other ``model_type``s; a ``gemma`` config that sets them is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sentcomp.models import decoder
from sentcomp.models.decoder import DecoderConfig

FAMILY = "gemma"
REFUSED = {
    "final_logit_softcapping": "Gemma 2's soft-capped logits",
    "attn_logit_softcapping": "Gemma 2's soft-capped attention scores",
    "query_pre_attn_scalar": "Gemma 2's attention scaling",
    "sliding_window": "Gemma 2's sliding-window layers",
    "use_bidirectional_attention": "bidirectional attention: not a causal LM",
}


def config_from_hf(config: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face ``GemmaConfig`` dict. The activation is
    ``hidden_activation`` (older configs) or ``hidden_act``; the legacy value ``"gelu"`` means the tanh
    approximation, as transformers reads it."""
    decoder.refuse_options(config, "Gemma", REFUSED)
    activation = config.get("hidden_activation") or config.get("hidden_act", "gelu_pytorch_tanh")
    bias = bool(config.get("attention_bias", False))
    return decoder.llama_style_config(
        config, "Gemma", norm="rms_plus_one", scale_embeddings=True, qkv_bias=bias, output_bias=bias,
        hidden_act="gelu_pytorch_tanh" if activation == "gelu" else activation,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def hf_config_dict(c: DecoderConfig) -> dict[str, Any]:
    """The Hugging Face ``GemmaConfig`` keys of ``c`` (inverse of :func:`config_from_hf`)."""
    return {**decoder.llama_style_hf_config(c), "attention_bias": c.qkv_bias}


SPEC = decoder.Family(FAMILY, "GemmaForCausalLM", config_from_hf, hf_config_dict)

# The family's entry points (sentcomp.models.load dispatches to from_hf) and facts (sentcomp.models.facts)
init, from_hf, save_hf = SPEC.init, SPEC.from_hf, SPEC.save_hf
FACTS = decoder.family_facts("Gemma")
