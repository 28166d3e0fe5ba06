"""Throughput and MFU (sentcomp.training.throughput): the FLOPs formula against hand counts of the matmul parameters of
tiny GPT-2 (tied and untied Φ) and Llama configs, the MFU arithmetic, the peak table and the measured CPU peak.
The pretraining and fine-tuning metrics rows' ``mfu`` are checked in test_pretrain.py and test_finetune.py."""

import types

import jax
import pytest

from sentcomp.models import gpt2, llama, qwen2
from sentcomp.models.decoder import DecoderConfig
from sentcomp.models.tokenizers import byte_tokenizer
from sentcomp.training import throughput

V, T, D, L = 257, 32, 32, 2  # vocabulary, context, width, layers


def gpt2_lm(tie: bool):
    config = gpt2.gpt2_config(vocab_size=V, n_embd=D, n_layer=L, n_head=2, n_positions=T, tie_word_embeddings=tie)
    return gpt2.init(config, rng=0, tokenizer=byte_tokenizer())


def gpt2_hand_count(d: int, n_layer: int, vocab: int) -> int:
    """Per layer: c_attn d·3d + 3d, attention c_proj d·d + d, c_fc d·4d + 4d, mlp c_proj 4d·d + d, two LayerNorms
    2·2d; then ln_f 2d and the output projection Φ V·d (wte and wpe are lookups)."""
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    assert per_layer == 12 * d * d + 13 * d
    return n_layer * per_layer + 2 * d + vocab * d


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_flops_match_a_hand_count(tie):
    lm = gpt2_lm(tie)
    n = gpt2_hand_count(D, L, V)
    assert throughput.matmul_params(lm) == n  # a tied Φ still costs its V·d matmul
    assert throughput.matmul_params(lm, output_projection=False) == n - V * D
    forward = 2 * n + 4 * L * T * D  # 2N + attention scores (2·T·d) and ·V (2·T·d) per layer
    assert throughput.lm_flops_per_token(lm, T, training=False) == forward
    assert throughput.lm_flops_per_token(lm, T) == 3 * forward == 6 * n + 12 * L * T * D
    assert throughput.transformer_flops_per_token(n, L, D, T) == 3 * forward


@pytest.mark.slow
def test_llama_flops_match_a_hand_count():
    heads, kv_heads, head_dim, inner = 4, 2, 8, 48
    config = llama.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=inner, num_hidden_layers=L,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                               tie_word_embeddings=True)
    lm = llama.init(config, rng=0)
    # q and o: d·(heads·head_dim) each; k and v: d·(kv_heads·head_dim) each; gate, up, down: d·inner each; two
    # RMSNorm scales d; final norm d; tied Φ V·d (embed_tokens itself is a lookup).
    per_layer = 2 * D * heads * head_dim + 2 * D * kv_heads * head_dim + 3 * D * inner + 2 * D
    n = L * per_layer + D + V * D
    assert throughput.matmul_params(lm) == n
    assert throughput.lm_flops_per_token(lm, T) == 3 * (2 * n + 4 * L * T * heads * head_dim)


@pytest.mark.slow
def test_every_shared_decoder_family_is_counted_like_llama():
    """Qwen2's q/k/v biases are matmul parameters too (heads·head_dim + 2·kv_heads·head_dim per layer)."""
    heads, kv_heads, head_dim, inner = 4, 2, 8, 48
    config = DecoderConfig(vocab_size=V, hidden_size=D, intermediate_size=inner, num_hidden_layers=L,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                           tie_word_embeddings=True, qkv_bias=True)
    lm = qwen2.init(config, rng=0)
    per_layer = (2 * D * heads * head_dim + 2 * D * kv_heads * head_dim + 3 * D * inner + 2 * D
                 + heads * head_dim + 2 * kv_heads * head_dim)
    assert lm.family == "qwen2" and throughput.matmul_params(lm) == L * per_layer + D + V * D
    assert throughput.attention_shape(lm) == (L, heads * head_dim)


def test_mfu_arithmetic():
    assert throughput.mfu(1000.0, 6e9, 1e12, 4) == pytest.approx(1000 * 6e9 / 4e12)
    assert throughput.mfu(2e5, 1e6, 1e12, 1) == pytest.approx(0.2)


def test_peak_flops_from_the_table_or_measured():
    for kind, peak in [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12)]:
        assert throughput.peak_flops(types.SimpleNamespace(device_kind=kind)) == peak
    cpu = jax.devices("cpu")[0]
    assert throughput.table_peak(cpu.device_kind) is None
    measured = throughput.peak_flops(cpu)
    assert 0 < measured < 1e15 and throughput.peak_flops(cpu) == measured  # cached per device kind


def test_a_recent_matmul_rate_is_reused_for_a_minute(monkeypatch):
    rates = iter([100.0, 200.0])
    monkeypatch.setattr(throughput, "measured_peak", lambda device: next(rates))
    monkeypatch.setattr(throughput, "_recent", {})
    cpu, gpu = (types.SimpleNamespace(device_kind=kind) for kind in ("cpu", "gpu"))
    rate_at = {now: throughput.recent_measured_peak(cpu, clock=lambda now=now: now) for now in (0.0, 59.9, 60.0)}
    assert rate_at == {0.0: 100.0, 59.9: 100.0, 60.0: 200.0}  # measured, reused, measured again
    monkeypatch.setattr(throughput, "measured_peak", lambda device: 300.0)
    assert throughput.recent_measured_peak(gpu, clock=lambda: 60.0) == 300.0  # each device kind its own
