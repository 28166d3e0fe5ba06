"""Scanned vs unrolled layers (and rematerialisation), and dense vs chunked attention memory, side by side in one run.

    .venv/bin/python benchmarks/layer_stack.py                # GPT-2-small-shaped, a couple of minutes on CPU
    .venv/bin/python benchmarks/layer_stack.py --layers=4     # a faster look

1. **The layer stack**: a GPT-2 of GPT-2-small's shape (12 layers, d = 768, 12 heads; a vocabulary of
   ``--vocab`` = 4,096 so the blocks, not the output layer, dominate) and one train step's work, next-token
   cross-entropy and its gradient with respect to every parameter, on ``--batch`` × ``--seq`` tokens. Each
   execution (:data:`sentcomp.models.layers.EXECUTION_FIELDS`: scanned or unrolled blocks, remat none / full /
   dots) is compiled (``jit(...).lower(...).compile()``, timed once) and then timed alike
   (``timing.time_calls``: a warm-up call, then the median of ``--repeats``). Before any ratio is printed, each
   one's loss and gradients are checked against the scanned model's (``timing.assert_same_output``, relative
   1e-4), so the ratios compare the same computation. Ratios are the scanned, no-remat model's time over each
   one's (< 1: slower). XLA's temporaries (``timing.xla_bytes``) show what remat saves.
2. **Attention memory at long T**: causal self-attention (1 sequence, 12 heads of 64) at ``--lengths``, forward
   and forward + backward, as XLA's own account of the compiled program's temporaries: ``xla``
   (``jax.nn.dot_product_attention``, a dense T×T block of scores) vs ``chunked`` (query blocks of ``--chunk``).
   Compiled only, never run, so T = 8192 costs nothing but compile time. The growth column is the temporaries'
   ratio from one length to the next: ~4× per doubling for dense, ~2× for chunked.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import optax
from timing import assert_same_output, format_ratio, load_average, speedup, time_calls, xla_bytes

from sentcomp.models import gpt2, layers

EXECUTIONS = {  # name -> execution fields; the first is the reference
    "scanned": dict(scan_layers=True, remat="none"),
    "unrolled": dict(scan_layers=False, remat="none"),
    "scanned + remat full": dict(scan_layers=True, remat="full"),
    "scanned + remat dots": dict(scan_layers=True, remat="dots"),
    "unrolled + remat dots": dict(scan_layers=False, remat="dots"),
}
TOLERANCE = dict(rtol=1e-4)


def loss_fn(config: gpt2.GPT2Config):
    """``params, tokens [B, T+1] -> mean next-token cross-entropy`` of the GPT-2 ``config`` (tied Φ = wte)."""
    def loss(params, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = gpt2.logits_fn(config, params, inputs, jnp.ones_like(inputs))
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss


def layer_stack_rows(config: gpt2.GPT2Config, batch: int, seq: int, repeats: int,
                     executions: dict[str, dict] = EXECUTIONS) -> list[dict]:
    """Per execution (``{name: execution fields}``, the first the reference): compile seconds, median step
    seconds, XLA temporaries; each one's loss and gradients checked against the reference's first."""
    params = jax.jit(lambda key: gpt2.GPT2(config).init(key, jnp.zeros((1, 1), jnp.int32),
                                                         jnp.ones((1, 1), jnp.int32))["params"])(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    rows, reference = [], None
    for name, fields in executions.items():
        step = jax.jit(jax.value_and_grad(loss_fn(dataclasses.replace(config, **fields))))
        start = time.perf_counter()
        compiled = step.lower(params, tokens).compile()
        compile_seconds = time.perf_counter() - start
        output = compiled(params, tokens)
        if reference is None:
            reference = output
        assert_same_output(f"{name} vs scanned: loss and gradients", output, reference, **TOLERANCE)
        rows.append({"name": name, "compile": compile_seconds,
                     "step": time_calls(lambda c=compiled: c(params, tokens), repeats).median,
                     **xla_bytes(compiled)})
    return rows


def attention_bytes(implementation: str, length: int, heads: int, head_dim: int, chunk: int, grad: bool) -> int:
    """XLA's temporaries of causal self-attention over ``length`` tokens (forward, or forward + backward)."""
    shape = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)

    def attention(q, k, v, mask):
        return layers.self_attention(q, k, v, mask, scale=head_dim**-0.5, causal=True,
                                     implementation=implementation, chunk=chunk)

    fn = jax.grad(lambda *args: attention(*args).sum(), argnums=(0, 1, 2)) if grad else attention
    compiled = jax.jit(fn).lower(shape, shape, shape, jax.ShapeDtypeStruct((1, length), jnp.int32)).compile()
    return xla_bytes(compiled)["scratch_bytes"]


def check_attention(length: int, heads: int, head_dim: int, chunk: int) -> None:
    """Chunked and dense attention (and their gradients) agree at ``length`` before their memory is compared."""
    q, k, v = jax.random.normal(jax.random.key(2), (3, 1, length, heads, head_dim))
    mask = jnp.ones((1, length), jnp.int32)
    outputs = {}
    for implementation in ("xla", "chunked"):
        def total(q, k, v, implementation=implementation):
            return jnp.sum(jnp.sin(layers.self_attention(q, k, v, mask, scale=head_dim**-0.5, causal=True,
                                                         implementation=implementation, chunk=chunk)))
        outputs[implementation] = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))(q, k, v)
    assert_same_output(f"chunked vs dense attention at T={length}", outputs["chunked"], outputs["xla"], **TOLERANCE)


def attention_rows(lengths: list[int], heads: int, head_dim: int, chunk: int) -> list[dict]:
    """Per length: the temporaries of dense and chunked attention, forward and forward + backward."""
    return [{"length": length, **{f"{impl}{' grad' * grad}": attention_bytes(impl, length, heads, head_dim, chunk,
                                                                            grad)
                                  for impl in ("xla", "chunked") for grad in (False, True)}} for length in lengths]


def print_layer_stack(rows: list[dict]) -> None:
    reference = rows[0]
    print("| execution | compile s | step ms | step ratio | compile ratio | XLA temporaries MB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['compile']:.1f} | {1e3 * row['step']:.0f} | "
              f"{format_ratio(speedup(reference['step'], row['step']))} | "
              f"{format_ratio(speedup(reference['compile'], row['compile']))} | {row['scratch_bytes'] / 2**20:.0f} |")


def print_attention(rows: list[dict]) -> None:
    columns = [key for key in rows[0] if key != "length"]
    print("| T | " + " | ".join(f"{c} MB | growth" for c in columns) + " |")
    print("|---|" + "---|---|" * len(columns))
    for previous, row in zip([None, *rows[:-1]], rows):
        cells = [f"{row[c] / 2**20:.1f} | " + (f"{row[c] / previous[c]:.2f}×" if previous else "-") for c in columns]
        print(f"| {row['length']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192])
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args()
    config = gpt2.gpt2_config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=args.vocab,
                              n_positions=max(args.seq, 64))
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), {load_average()}")
    print(f"\nGPT-2 L={args.layers} d={args.width} heads={args.heads} V={args.vocab}, {args.batch}×{args.seq} tokens, "
          "loss + gradients\n")
    print_layer_stack(layer_stack_rows(config, args.batch, args.seq, args.repeats))
    head_dim = args.width // args.heads
    check_attention(2 * args.chunk + 3, args.heads, head_dim, args.chunk)
    print(f"\nCausal attention, 1 × T tokens, {args.heads} heads of {head_dim}, chunk {args.chunk}: XLA temporaries\n")
    print_attention(attention_rows(args.lengths, args.heads, head_dim, args.chunk))
    print(f"\nafter: {load_average()}")


if __name__ == "__main__":
    main()
