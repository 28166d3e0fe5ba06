"""GPT-NeoX causal LMs (Pythia, GPT-NeoX-20B): the shared rotary decoder (:mod:`sentcomp.models.decoder`) with
LayerNorms (with biases), a plain MLP ``W_down GELU(W_up x)`` with biases, one fused q/k/v projection (per head
``[q; k; v]``, ``query_key_value``), rotary embeddings on the first ``rotary_pct`` of each head's dims (Pythia:
25%), the parallel residual ``x + Attn(N₁x) + MLP(N₂x)`` (``use_parallel_residual``; false: sequential) and
untied output embeddings ``embed_out``. The tokenizer is the directory's own (``GPTNeoXTokenizer``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sentcomp.errors import SentcompError
from sentcomp.models import decoder
from sentcomp.models.decoder import DecoderConfig

FAMILY = "gpt_neox"
NAMES = decoder.HFNames(
    embedding="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    output="embed_out",
    layer="gpt_neox.layers.{}.",
    layer_modules={
        "self_attn/qkv_proj": "attention.query_key_value",
        "self_attn/o_proj": "attention.dense",
        "mlp/up_proj": "mlp.dense_h_to_4h",
        "mlp/down_proj": "mlp.dense_4h_to_h",
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
    },
    # causal-mask and rotary buffers that older checkpoints (e.g. Pythia's) store
    ignored_suffixes=(".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq"),
    aliases={"lm_head.weight": "embed_out.weight"},  # transformers 5 saves embed_out as lm_head
)


def config_from_hf(config: Mapping[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a Hugging Face ``GPTNeoXConfig`` dict: rotary base ``rotary_emb_base`` and
    fraction ``rotary_pct`` (default 0.25) unless ``rope_parameters`` give them (transformers 5)."""
    try:
        heads, width = config["num_attention_heads"], config["hidden_size"]
        bias = bool(config.get("attention_bias", True))
        return DecoderConfig(
            vocab_size=config["vocab_size"],
            hidden_size=width,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=width // heads,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            norm="layer",
            norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            mlp="plain",
            hidden_act=config.get("hidden_act", "gelu"),
            mlp_bias=True,
            qkv_bias=bias,
            output_bias=bias,
            fused_qkv=True,
            parallel_residual=bool(config.get("use_parallel_residual", True)),
            **decoder.hf_rope_fields(config, "GPT-NeoX", default_theta=config.get("rotary_emb_base", 10000.0),
                                     default_partial=config.get("rotary_pct", 0.25)),
        )
    except KeyError as error:
        raise SentcompError(f"GPT-NeoX config is missing the key {error.args[0]!r}.") from None


def hf_config_dict(c: DecoderConfig) -> dict[str, Any]:
    """The Hugging Face ``GPTNeoXConfig`` keys of ``c`` (inverse of :func:`config_from_hf`)."""
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        layer_norm_eps=c.norm_eps, hidden_act=c.hidden_act, attention_bias=c.qkv_bias,
        use_parallel_residual=c.parallel_residual,
        rope_parameters={"partial_rotary_factor": c.partial_rotary_factor, **decoder.hf_rope_parameters(c)},
    )


SPEC = decoder.Family(FAMILY, "GPTNeoXForCausalLM", config_from_hf, hf_config_dict, NAMES)

# The family's entry points (sentcomp.models.load dispatches to from_hf) and facts (sentcomp.models.facts): a plain
# MLP of width 4·d by default (as GPT-2), and no grouped-query attention
init, from_hf, save_hf = SPEC.init, SPEC.from_hf, SPEC.save_hf
FACTS = decoder.family_facts("GPT-NeoX", mlp_width=lambda d: 4 * d, grouped_query=False)
