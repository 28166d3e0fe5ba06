"""Quad vs cross-entropy pretraining cost, side by side in one run.

    .venv/bin/python benchmarks/train_step.py              # the issue's sizes: N = 512 .. 16,384 (slow on CPU)
    .venv/bin/python benchmarks/train_step.py --max-n=4096  # a faster look
    .venv/bin/python benchmarks/train_step.py --fsdp-only   # just the memory table of part 3

1. **The loss head alone** at GPT-2-small width (d = 768, V = 50,257): features ``h [N, d]`` → loss → gradients
   with respect to ``h`` and Φ, for N positions per step. Cross-entropy (:func:`sentcomp.kernels.xent_loss`,
   streamed over V in chunks, so it never holds ``[N, V]`` either, but computes all N·V logits twice: forward and
   backward, ~6·N·V·d flops) vs Quad (:func:`sentcomp.kernels.quad_loss`: Gram matrix ``ΦᵀΦ`` and ``Φ H``,
   ~4·V·d² + O(N·d²) flops). The time ratio should grow like N/d once N > d; the crossover is the N where Quad
   becomes faster. Memory is XLA's own account of the compiled step (temporaries + outputs, inputs excluded).
2. **A whole training step** (forward, backward, AdamW) of a tiny GPT-2 (2 layers, d = 64, GPT-2's vocabulary,
   16 × 64 tokens) with each loss, on 1 device and on every device (8 simulated CPU devices share the same cores
   here, so 8 shows the sharding overhead, not a speed-up).
3. **Memory per device under FSDP**: the AdamW train step of a GPT-2-small-shaped model (124M parameters, tied
   embeddings, float32, cross-entropy) compiled for the 8 devices on the mesh ``data × fsdp`` with fsdp = 1 (the
   replicated baseline: every device holds all parameters and optimiser state), 2, 4 and 8, from abstract
   parameters (``jax.eval_shape``; ``.lower().compile()``, no weights exist and no step runs). XLA's memory
   analysis of the compiled step, per device: ``state`` = the step's inputs (parameters, Adam's moments, the
   batch shard), ``temp`` = its temporaries (activations, gradients, gathered weights), ``total`` = inputs +
   temporaries + outputs not aliased to the (donated) inputs. The global batch (8 sequences of
   ``--fsdp-seq-len`` tokens, one per device) is the same at every fsdp size.

Both losses are timed alike (``timing.time_calls``): one warm-up call (compilation), then the median of
``--repeats`` calls. Before the table, each loss head is checked at the smallest N against its materialised
form (``[N, V]`` logits in jnp, ``benchmarks/kernels.py``): value and both gradients within a relative
tolerance of 1e-4 (``timing.assert_same_output``), so the ratio compares two correct computations.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from kernels import QUAD_TOLERANCE, inputs, materialised_quad, materialised_xent
from timing import assert_same_output, format_ratio, speedup, time_calls, xla_bytes

from sentcomp import kernels

D, V = 768, 50_257
LOSS_HEADS = {"xent": (kernels.xent_loss, materialised_xent), "quad": (kernels.quad_loss, materialised_quad)}


def check_loss_heads(n: int, dim: int = D, vocab: int = V) -> None:
    """Each loss kernel's value and gradients (h, Φ) equal its materialised form's at ``n`` positions."""
    args = [jax.device_put(x) for x in inputs(n, dim, vocab)]
    for name, (ours, reference) in LOSS_HEADS.items():
        got, want = (jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*args) for fn in (ours, reference))
        assert_same_output(f"{name} loss head at N={n}", got, want, **QUAD_TOLERANCE)


def loss_head(loss_name: str, n: int, repeats: int, dim: int = D, vocab: int = V) -> dict:
    """Compiled value + gradients of one loss kernel: median seconds and XLA's temporaries + outputs."""
    args = [jax.device_put(x) for x in inputs(n, dim, vocab)]
    step = jax.jit(jax.value_and_grad(LOSS_HEADS[loss_name][0], argnums=(0, 1))).lower(*args).compile()
    return {"seconds": time_calls(lambda: step(*args), repeats).median, "bytes": xla_bytes(step)["peak_bytes"]}


def training_step(loss_name: str, devices, repeats: int) -> float:
    import ml_collections

    from sentcomp import parallel
    from sentcomp.models import gpt2
    from sentcomp.training import steps

    config = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=10, decay="cosine", end_lr_fraction=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))
    mesh = parallel.data_mesh(devices)
    lm = gpt2.init(gpt2.gpt2_config(n_layer=2, n_embd=64, n_head=2, n_positions=64), 0, quad_head=True)
    optimizer = steps.make_optimizer(config, 100, lm.params)
    step = steps.make_train_step(loss_name, lm.hidden_fn, lm.phi_fn, optimizer, np.float32, mesh)
    state = steps.initial_state(lm.params, optimizer, mesh)
    tokens = parallel.shard_batch(np.random.default_rng(0).integers(0, V, (16, 1, 65)).astype(np.int32), mesh)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], tokens)
        return metrics["loss"]

    return time_calls(one_step, repeats).median


def fsdp_memory(fsdp: int, seq_len: int) -> dict[str, int]:
    """XLA's per-device bytes of the GPT-2-small train step on the 8-device mesh ``{data: 8/fsdp, fsdp}``."""
    import functools

    import jax.numpy as jnp
    import ml_collections

    from sentcomp import parallel
    from sentcomp.models import gpt2
    from sentcomp.models.tokenizers import byte_tokenizer
    from sentcomp.training import steps

    config = gpt2.gpt2_config(n_positions=seq_len)  # GPT-2 small: 12 layers, d = 768, V = 50,257, tied
    params = jax.eval_shape(lambda key: gpt2.init(config, key, tokenizer=byte_tokenizer()).params, jax.random.key(0))
    optimizer = steps.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=6e-4, warmup_steps=10, decay="cosine", end_lr_fraction=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)), 100, params)
    mesh = parallel.make_mesh({"data": -1, "fsdp": fsdp})
    state = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                         state, parallel.state_shardings(mesh, state))
    tokens = jax.ShapeDtypeStruct((len(jax.devices()), 1, seq_len + 1), jnp.int32,
                                  sharding=parallel.batch_sharding(mesh))
    step = steps.make_train_step("xent", functools.partial(gpt2.hidden_fn, config), gpt2.phi_fn, optimizer,
                                    jnp.float32, mesh)
    analysis = step.lower(state, tokens).compile().memory_analysis()
    inputs, temp = int(analysis.argument_size_in_bytes), int(analysis.temp_size_in_bytes)
    fresh_outputs = int(analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    return {"parameters": sum(leaf.size for leaf in jax.tree.leaves(params)), "state": inputs, "temp": temp,
            "total": inputs + temp + fresh_outputs}


def print_fsdp_memory(seq_len: int) -> None:
    rows = {fsdp: fsdp_memory(fsdp, seq_len) for fsdp in (1, 2, 4, 8)}
    base = rows[1]
    print(f"Memory per device, GPT-2 small ({base['parameters'] / 1e6:.1f}M parameters, float32, AdamW), "
          f"{len(jax.devices())} devices, 8 × {seq_len} tokens per step (XLA memory analysis)")
    print("| mesh | state MiB | temp MiB | total MiB | state vs replicated | total vs replicated |\n"
          "|---|---|---|---|---|---|")
    for fsdp, row in rows.items():
        name = f"data {len(jax.devices()) // fsdp} × fsdp {fsdp}" + (" (replicated)" if fsdp == 1 else "")
        print(f"| {name} | {row['state'] / 2**20:,.0f} | {row['temp'] / 2**20:,.0f} | {row['total'] / 2**20:,.0f} | "
              f"{row['state'] / base['state']:.2f} | {row['total'] / base['total']:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-n", type=int, default=16_384)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median reported)")
    parser.add_argument("--fsdp-seq-len", type=int, default=256, help="tokens per sequence in the FSDP table")
    parser.add_argument("--fsdp-only", action="store_true", help="print only the FSDP memory table (part 3)")
    args = parser.parse_args()
    if args.fsdp_only:
        print_fsdp_memory(args.fsdp_seq_len)
        return

    ns = [n for n in (512, 1024, 2048, 4096, 8192, 16_384) if n <= args.max_n]
    check_loss_heads(ns[0])
    print(f"checked: each loss head equals its materialised [N, V] form at N = {ns[0]} ({QUAD_TOLERANCE})")
    print(f"Loss head: value + gradients w.r.t. h and Φ, d={D}, V={V:,} ({jax.devices()[0].platform})")
    print("| N | xent ms | quad ms | speed-up | N/d | xent MiB | quad MiB | memory ratio |\n"
          "|---|---|---|---|---|---|---|---|")
    crossover = None
    for n in ns:
        xent, quad = loss_head("xent", n, args.repeats), loss_head("quad", n, args.repeats)
        ratio = speedup(xent["seconds"], quad["seconds"])
        crossover = crossover or (n if ratio > 1 else None)
        print(f"| {n:,} | {xent['seconds']*1e3:,.0f} | {quad['seconds']*1e3:,.0f} | {format_ratio(ratio)} | "
              f"{n / D:.2f} | {xent['bytes']/2**20:,.0f} | {quad['bytes']/2**20:,.0f} | "
              f"{format_ratio(xent['bytes'] / max(quad['bytes'], 1))} |", flush=True)
    print(f"Crossover: Quad is faster from N = {crossover} on (of those measured).\n" if crossover
          else "Crossover: Quad was not faster at any measured N.\n")

    print("Whole training step, tiny GPT-2 (2 layers, d=64, V=50,257, Quad head), 16 × 64 tokens, AdamW")
    print("| loss | 1 device ms | " + f"{len(jax.devices())} devices ms |\n|---|---|---|")
    for loss_name in ("xent", "quad"):
        one = training_step(loss_name, jax.devices()[:1], args.repeats)
        every = training_step(loss_name, jax.devices(), args.repeats)
        print(f"| {loss_name} | {one*1e3:,.0f} | {every*1e3:,.0f} |", flush=True)
    print()
    print_fsdp_memory(args.fsdp_seq_len)


if __name__ == "__main__":
    # Read when JAX first starts its backends (in main), so set here, not on import (tests import this file).
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
