"""Feature-extraction throughput vs HF transformers' PyTorch GPT2Model, and bounded memory for Φp_f.

    .venv/bin/python benchmarks/extract.py                  # 256 texts, batch 32 (~2-4 min on 2 cores)
    .venv/bin/python benchmarks/extract.py --n 64 --memory-n 2000   # quicker look

1. Throughput, side by side in one process on the same CPU: GPT-2-small-shaped models with random weights
   (d=768, 12 layers, 12 heads, V=50,257), the same real texts (Rotten Tomatoes snippets, real GPT-2
   tokenizer, at most 512 tokens) and the same batch size. Ours: ``sentcomp.features.extract_features`` for
   kind ``f`` (tokenize, bucket, forward, gather the last token). HF: ``GPT2Model`` under
   ``torch.inference_mode`` on tokenizer-padded batches (right padding, last non-pad hidden state), once in
   the given text order (what a user writes) and once length-sorted (what our bucketing does). Compilation is
   excluded (one warm-up pass each); the best of ``--repeats`` timed passes is reported as real tokens/s
   (padding not counted) and the ratio ours / best HF variant. Target ≥ 1.0×.
2. Memory: ``phi_p_f`` for ``--memory-n`` (default 20,000) texts and for a tenth of them, each in a fresh
   subprocess, with GPT-2-small's embedding shape (V=50,257, d=768) but one transformer layer and at most 64
   tokens (Φp_f's memory depends on neither; 12 layers would take ~10 min here). Reported: the rise of peak
   RSS during the call (compilation and the per-batch activations included) for both N, next to the N×V
   float32 buffer a materialised softmax would need. Bounded = the rise does not grow with N.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

MAX_LENGTH = 512
MEMORY_MAX_LENGTH = 64


def _texts(n: int) -> list[str]:
    from sentcomp.data.rotten_tomatoes import read_snippets

    snippets = read_snippets().texts
    return [snippets[i % len(snippets)] for i in range(n)]


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compilation / allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _hf_pass(model, tokenizer, texts, batch_size, sort_by_length):
    import torch

    order = np.arange(len(texts))
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start:start + batch_size]]
            encoded = tokenizer(batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            last = encoded["attention_mask"].sum(1) - 1
            outputs.append(hidden[torch.arange(len(batch)), last])
    return torch.cat(outputs)


def throughput(n: int, batch_size: int, repeats: int) -> dict:
    import torch
    import transformers

    from sentcomp import features
    from sentcomp.data import text
    from sentcomp.models import gpt2

    texts = _texts(n)
    lm = gpt2.init(gpt2.gpt2_config("small"), rng=0)
    n_tokens = sum(len(ids) for ids in text.encode_texts(lm.tokenizer, texts, MAX_LENGTH).token_ids)

    def ours():
        features.extract_features(lm, texts, ("f",), batch_size=batch_size, max_length=MAX_LENGTH, progress=False)

    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config()).eval()
    tokenizer = lm.tokenizer  # the same real GPT-2 tokenizer
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    results = {"n_texts": n, "batch_size": batch_size, "real_tokens": n_tokens,
               "torch_threads": torch.get_num_threads()}
    for name, fn in [
        ("sentcomp_jax", ours),
        ("hf_torch_given_order", lambda: _hf_pass(model, tokenizer, texts, batch_size, False)),
        ("hf_torch_length_sorted", lambda: _hf_pass(model, tokenizer, texts, batch_size, True)),
    ]:
        seconds = _best_seconds(fn, repeats)
        results[name] = {"seconds": round(seconds, 3), "tokens_per_s": round(n_tokens / seconds, 1)}
        print(f"{name:24s} {n_tokens / seconds:9.1f} tokens/s  ({seconds:.2f} s)", flush=True)
    best_hf = max(results[k]["tokens_per_s"] for k in ("hf_torch_given_order", "hf_torch_length_sorted"))
    results["ratio_vs_best_hf"] = round(results["sentcomp_jax"]["tokens_per_s"] / best_hf, 3)
    results["ratio_vs_hf_given_order"] = round(
        results["sentcomp_jax"]["tokens_per_s"] / results["hf_torch_given_order"]["tokens_per_s"], 3)
    return results


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def memory_case(n: int, batch_size: int) -> dict:
    """Runs in a fresh process: peak RSS rise while extracting Φp_f for ``n`` texts."""
    from sentcomp import features
    from sentcomp.models import gpt2

    texts = _texts(n)
    lm = gpt2.init(gpt2.gpt2_config("small", n_layer=1), rng=0)
    vocab, dim = lm.phi.shape
    before = _current_rss_bytes()
    start = time.perf_counter()
    result = features.extract_features(lm, texts, ("phi_p_f",), batch_size=batch_size, max_length=MEMORY_MAX_LENGTH,
                                       progress=True)
    seconds = time.perf_counter() - start
    rise = max(_peak_rss_bytes() - before, 0)
    assert result["phi_p_f"].shape == (n, dim)
    return {"n_texts": n, "seconds": round(seconds, 1), "tokens": result["metadata"]["n_tokens"],
            "peak_rss_rise_mb": round(rise / 2**20, 1), "n_by_v_float32_mb": round(n * vocab * 4 / 2**20, 1),
            "n_by_d_result_mb": round(n * dim * 4 / 2**20, 1)}


def _run_memory_case(n: int, batch_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-case", "--memory-n", str(n), "--batch-size",
                          str(batch_size)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="texts for the throughput comparison")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-n", type=int, default=20_000, help="texts for the Φp_f memory check (0: skip)")
    parser.add_argument("--memory-case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_n, args.batch_size)))
        return
    results = {"throughput": throughput(args.n, args.batch_size, args.repeats)}
    print(f"ratio sentcomp / best HF torch: {results['throughput']['ratio_vs_best_hf']:.2f}x "
          f"(vs HF in given order: {results['throughput']['ratio_vs_hf_given_order']:.2f}x)", flush=True)
    if args.memory_n:
        results["memory_phi_p_f"] = [_run_memory_case(n, args.batch_size) for n in (args.memory_n // 10, args.memory_n)]
        for m in results["memory_phi_p_f"]:
            print(f"Φp_f over {m['n_texts']:6d} texts: peak RSS rise {m['peak_rss_rise_mb']:7.1f} MB; a materialised "
                  f"N×V float32 softmax: {m['n_by_v_float32_mb']:8.1f} MB; result N×d {m['n_by_d_result_mb']} MB; "
                  f"{m['seconds']} s", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
