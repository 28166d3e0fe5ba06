"""Shared by test_llama.py and test_gguf.py: tiny random Hugging Face Llamas, a tiny real byte-level BPE
tokenizer, and a GGUF writer that lays tensors out the way llama.cpp's converter does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

SENTENCES = [
    "A gorgeous, witty, seductive movie.",
    "The acting is terrible and the plot makes no sense at all!",
    "It's a charming, if slight, film about 3 friends in 1999.",
    "Boring.",
    "An intelligent, moving and funny picture that never forgets its heart.",
    "Don't bother: the script was written in 20 minutes, and it shows.",
]


def tiny_byte_bpe(vocab_size: int):
    """A real byte-level BPE tokenizer (GPT-2 style, 256 byte symbols + merges) trained on ``SENTENCES``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


# head_dim 6, θ = 500: wavelengths 6.3, 50 and 395 tokens, one in each llama3 regime for a context of 32
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def tiny_hf_llama(directory: Path, tie_word_embeddings: bool, vocab_size: int = 301, seed: int = 0,
                  rope_scaling: dict | None = None):
    """A random ``LlamaForCausalLM`` with grouped-query attention and odd sizes, saved with ``save_pretrained``
    (with its tokenizer) in ``directory``; weights are scaled up (std 0.3, random norm gains) so that errors
    would show in the logits. Returns the PyTorch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=36,
        intermediate_size=53,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, **(rope_scaling or {})},
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        initializer_range=0.3,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
    model.save_pretrained(directory)
    tiny_byte_bpe(vocab_size).save_pretrained(directory)
    return model


def hf_logits(model, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The PyTorch model's logits ``[B, T, V]``."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor(token_ids), attention_mask=torch.tensor(attention_mask))
    return out.logits.float().numpy()


def assert_long_context_logits_match(lm, model, plain) -> None:
    """Over 60 positions (past the scaled context): ``lm``'s logits match the PyTorch ``model``'s to 1e-4, and
    differ by > 0.1 from ``plain``, the same weights without rotary scaling."""
    import jax.numpy as jnp

    ids = (np.arange(60)[None] * 7 + 3) % model.config.vocab_size
    mask = np.ones_like(ids)
    expected = hf_logits(model, ids, mask)
    got = np.asarray(jnp.einsum("btd,vd->btv", lm.hidden(jnp.asarray(ids), jnp.asarray(mask)), lm.phi))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected - hf_logits(plain, ids, mask)).max() > 0.1


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's q/k row permutation (half-split rotary -> interleaved), written here
    from its definition: ``w.reshape(n_heads, 2, head_dim/2, in).swapaxes(1, 2).reshape(w.shape)``."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's convert_hf_to_gguf.py writes for llama3 rotary scaling, written here
    from its definition: per frequency, 1 below wavelength L/high_freq_factor, ``factor`` above L/low_freq_factor,
    ``1/((1 − s)/factor + s)`` in between, ``s = (L/wavelength − low)/(high − low)``."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    factors = []
    for frequency in 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim):
        wavelength = 2 * math.pi / frequency
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_gguf(path: Path, model, tokenizer, architecture: str = "llama", pre: str = "gpt2", raw_tensors=None):
    """Writes ``model`` (a PyTorch ``LlamaForCausalLM``) and ``tokenizer`` as a float32 GGUF file, as llama.cpp
    would. ``raw_tensors``: ``{gguf_name: (uint8 bytes [rows, bytes_per_row], GGMLQuantizationType)}`` written
    instead of the model's tensor of that name. Only gguf's writer API is used, not sentcomp.
    """
    raw_tensors = raw_tensors or {}
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    added = {token["content"]: token["id"] for token in backend["added_tokens"]}
    tokens = [None] * config.vocab_size
    for token, index in {**vocab, **added}.items():
        tokens[index] = token
    token_types = [3 if token in added else 1 for token in tokens]
    for index, token in enumerate(tokens):  # the model has more rows than the tokenizer has tokens
        if token is None:
            tokens[index], token_types[index] = f"<unused{index}>", 5
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(False)

    if config.rope_parameters["rope_type"] == "llama3":  # llama.cpp keeps no scaling metadata, only this tensor
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(config.rope_parameters, config.head_dim))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in model.state_dict().items():
        weight = tensor.float().numpy()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                weight = llama_cpp_permute(weight, heads)
            elif module == "self_attn.k_proj":
                weight = llama_cpp_permute(weight, kv_heads)
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        if gguf_name in raw_tensors:
            data, dtype = raw_tensors[gguf_name]
            writer.add_tensor(gguf_name, data, raw_dtype=dtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
