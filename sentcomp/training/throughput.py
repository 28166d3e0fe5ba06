"""Throughput and model FLOPs utilisation (MFU) of a training run: pure functions, no I/O.

**Model FLOPs per token** (Kaplan et al. 2020, Table 1; Chowdhery et al. 2022, PaLM, appendix B). For a decoder
or encoder with ``N`` matmul parameters, ``L`` layers, attention width ``d_attn`` (heads × head size) and
sequence length ``T``, one token's forward pass costs

    C_forward ≈ 2·N + 4·L·T·d_attn

``2·N``: every weight matrix is used in one multiply-add per token; ``4·L·T·d_attn``: per layer, the attention
scores ``q·kᵀ`` against ``T`` keys (``2·T·d_attn``) and the weighted sum of ``T`` values (``2·T·d_attn``), not
halved for the causal mask (PaLM's convention; Kaplan's ``2·L·T·d_attn`` counts the scores only). Training
(forward + backward, the backward pass costing twice the forward) is ``3 × C_forward = 6·N + 12·L·T·d_attn``.
These are the FLOPs of the model, not of our implementation: recomputation (rematerialisation), the softmax,
norms, and the Quad loss's Gram trick (which never forms the V-wide logits) do not change them.

``N`` excludes the input embedding lookups (a gather, no FLOPs) but counts the output projection Φ ``[V, d]``
(a matmul, ``2·V·d`` per token forward) even when it is tied to the input embedding: :func:`matmul_params`.

**MFU** = achieved model FLOP/s ÷ peak FLOP/s of the devices = ``tokens/s · FLOPs/token / (peak · n_devices)``
(:func:`mfu`). The peak (:func:`peak_flops`) is the vendor's dense bf16 figure for known TPUs and GPUs; for
anything else (CPUs among them) it is *measured* with a float32 matmul benchmark, so a CPU MFU is relative to
that benchmark, not to a datasheet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentcomp import models

# Dense bf16 peak FLOP/s per JAX device (``device.device_kind``, matched case-insensitively as a substring, first
# match wins, so the more specific names come first). Vendor figures:
#   TPU: cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version pages (v2, v3: per chip, a JAX
#   device is one of its two cores; v4 onwards one device per chip): v2 45e12/chip, v3 123e12/chip, v4 275e12,
#   v5e 197e12, v5p 459e12, v6e (Trillium) 918e12.
#   NVIDIA datasheets (dense, i.e. without the 2:4 sparsity doubling): A100 312e12, H100 SXM 989e12,
#   H100 PCIe 756e12, H200 989e12, L40S 362e12, L4 121e12, A10(G) 125e12, V100 (fp16 tensor cores) 125e12.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12), ("tpu v3", 123e12 / 2), ("tpu v2", 45e12 / 2),
    ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12),
    ("l40s", 362e12), ("l4", 121e12), ("a10", 125e12), ("v100", 125e12),
)
BENCHMARK_SIZE = 2048  # n of the n × n float32 matmul that measures an unknown device's peak
BENCHMARK_REPEATS = 5
_measured: dict[str, float] = {}  # device_kind -> measured peak FLOP/s (one benchmark per process and kind)
RECENT_SECONDS = 60.0  # a matmul rate measured this long ago still stands for "now" (recent_measured_peak)
_recent: dict[str, tuple[float, float]] = {}  # device_kind -> (clock when measured, FLOP/s)


def transformer_flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int,
                                training: bool = True) -> float:
    """Model FLOPs per token: forward ``2·n_params + 4·n_layer·seq_len·d_model``, training ``3 ×`` that.

    ``n_params``: matmul parameters (without the input embedding lookups, with the output projection:
    :func:`matmul_params`); ``d_model``: the attention width (heads × head size, ``d`` for GPT-2 and BERT);
    ``seq_len``: the length attended over (causal masking not halved)."""
    forward = 2.0 * n_params + 4.0 * n_layer * seq_len * d_model
    return 3.0 * forward if training else forward


def matmul_params(lm, output_projection: bool = True) -> int:
    """``N`` of :func:`transformer_flops_per_token` for a :class:`~sentcomp.models.base.LanguageModel`: every
    parameter except the input embedding lookups (its family's ``FamilyFacts.lookups``: GPT-2 ``wte``, ``wpe``;
    Llama ``embed_tokens``; BERT word, position and token-type embeddings), plus ``V·d`` for the output projection
    Φ when it is tied to the input embedding (a tied Φ is still a ``[V, d]`` matmul per token).
    ``output_projection=False`` leaves Φ (and ``FamilyFacts.output_head``, BERT's MLM transform) out, for training
    that never computes word logits (fine-tuning a classifier head)."""
    facts = models.facts(lm.family)
    skip = set(facts.lookups)
    if not output_projection:
        skip |= set(facts.output_head)
        if facts.untied_phi is not None:  # a family that never unties Φ has no untied Φ to leave out
            skip.add(facts.untied_phi)
    n = sum(int(np.prod(np.shape(leaf))) for key, sub in lm.params.items() if key not in skip
            for leaf in jax.tree.leaves(sub))
    if output_projection and facts.untied_phi not in lm.params:
        n += int(np.prod(np.shape(lm.params[facts.input_embedding]["embedding"])))
    return n


def attention_shape(lm) -> tuple[int, int]:
    """``(n_layer, d_attn)`` of a LanguageModel: its layer count and attention width (heads × head size), from its
    family's ``FamilyFacts.attention_shape``."""
    return models.facts(lm.family).attention_shape(lm.config)


def lm_flops_per_token(lm, seq_len: int, training: bool = True, output_projection: bool = True) -> float:
    """:func:`transformer_flops_per_token` of a LanguageModel (``N`` from :func:`matmul_params`)."""
    return transformer_flops_per_token(matmul_params(lm, output_projection), *attention_shape(lm), seq_len,
                                       training)


def mfu(tokens_per_second: float, flops_per_token: float, peak: float, n_devices: int) -> float:
    """Model FLOPs utilisation: ``tokens_per_second · flops_per_token / (peak · n_devices)`` (``peak`` per device)."""
    return tokens_per_second * flops_per_token / (peak * n_devices)


def table_peak(device_kind: str) -> float | None:
    """The datasheet dense bf16 peak FLOP/s of a device kind in :data:`PEAK_FLOPS`, else None."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def measured_peak(device, n: int = BENCHMARK_SIZE, repeats: int = BENCHMARK_REPEATS) -> float:
    """``2n³ / t`` with ``t`` the median time of a jitted ``n × n`` float32 matmul on ``device`` (after a warm-up)."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - began)
    return 2.0 * n**3 / max(float(np.median(times)), 1e-12)


def recent_measured_peak(device, max_age: float = RECENT_SECONDS, clock: Callable[[], float] = time.monotonic
                         ) -> float:
    """:func:`measured_peak` of ``device``, or the rate this process measured for its kind less than ``max_age``
    seconds ago: a composed experiment's many short runs (each recording the rate beside its wall times) measure
    it about once a minute, not once each (~0.5 s on 2 idle CPU cores)."""
    kind = str(device.device_kind)
    taken = _recent.get(kind)
    now = clock()
    if taken is None or now - taken[0] >= max_age:
        taken = _recent[kind] = (now, measured_peak(device))
    return taken[1]


def peak_flops(device: Any) -> float:
    """Peak FLOP/s of one device: the vendor's dense bf16 figure if ``device.device_kind`` is in
    :data:`PEAK_FLOPS` (TPU v2–v6e, A100, H100, ...), else measured by :func:`measured_peak` (a float32 matmul
    benchmark, once per device kind and process). CPU peaks are always measured: a CPU MFU is relative to that
    matmul benchmark, not to a datasheet."""
    kind = str(device.device_kind)
    peak = table_peak(kind)
    if peak is not None:
        return peak
    if kind not in _measured:
        _measured[kind] = measured_peak(device)
    return _measured[kind]
