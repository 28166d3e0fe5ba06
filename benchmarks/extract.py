"""Feature-extraction throughput vs HF transformers' PyTorch GPT2Model, bounded memory for Φp_f, float32 vs
bfloat16 and KV-cached vs uncached k-shot scoring on SmolLM2-135M's real weights.

    .venv/bin/python benchmarks/extract.py                  # 256 texts, batch 32 (~2-4 min on 2 cores)
    .venv/bin/python benchmarks/extract.py --n 64 --memory-n 2000   # quicker look

1. Throughput, side by side in one process on the same CPU: one GPT-2-small-shaped model with random weights
   (d=768, 12 layers, 12 heads, V=50,257), the same weights on both sides (ours written with ``gpt2.save_hf``
   and read by HF's ``GPT2LMHeadModel.from_pretrained``), the same real texts (Rotten Tomatoes snippets, real
   GPT-2 tokenizer, at most 512 tokens) and the same batch size. Ours: ``sentcomp.features.extract_features``
   for kind ``f`` (tokenize, bucket, forward, gather the last token). HF: its ``GPT2Model`` under
   ``torch.inference_mode`` on tokenizer-padded batches (right padding, last non-pad hidden state), once in
   the given text order (what a user writes) and once length-sorted (what our bucketing does). Before any
   ratio, ours and HF's features must agree (``FEATURE_TOLERANCE``, relative to their largest magnitude).
   Both timed alike (``timing.time_calls``): one warm-up pass (compilation), then the median of ``--repeats``
   passes, reported as real tokens/s (padding not counted) and the ratio ours / best HF variant. Target
   ≥ 1.0×. PyTorch uses its default thread count (printed), XLA every core.
2. Memory: ``phi_p_f`` for ``--memory-n`` (default 20,000) texts and for a tenth of them, each in a fresh
   subprocess, with GPT-2-small's embedding shape (V=50,257, d=768) but one transformer layer and at most 64
   tokens (Φp_f's memory depends on neither; 12 layers would take ~10 min here). Reported: the rise of peak
   RSS during the call (compilation and the per-batch activations included) for both N, next to the N×V
   float32 buffer a materialised softmax would need: a computed size, not a measurement (no materialised
   run is made), so the two are not like for like; the measured claim is "bounded" = the rise does not grow
   with N.
3. ``--dtypes``: the main job's model (SmolLM2-135M, real weights, offline asset) extracting f(s) of the same
   ``--n`` snippets in float32 and in bfloat16, side by side (warm-up, median of ``--repeats``): f(s) checked
   close first (``BF16_TOLERANCE``: bf16 rounds every activation), then tokens/s of each and bf16 / f32.
4. ``--kv-cache``: the same model scoring the main job's 2-shot zero-shot pass (``--n`` test snippets after two
   seeded, class-balanced train demonstrations, the task's template and words): ``zeroshot.word_scores`` with
   the shared prefix's keys/values cached vs every row read whole; scores checked equal first
   (``KV_TOLERANCE``), then the ratio uncached / cached time.
5. ``--one-pass``: the same model extracting the main job's rows of the same ``--n`` snippets: the text alone
   (f, Φp_f, the label words' logits), text + prompt (f, Φp_f, the label words' log-probs) and text + each of
   the task's three other templates (the label words' log-probs), once as :func:`sentcomp.features.extract_rows`
   (each text read once, every prompt's row continued from its cached keys/values) and once row by row
   (``extract_features`` per row, every row read whole); every kind of every row checked equal first
   (``ONE_PASS_TOLERANCE``), then the ratio row-by-row / one-pass time. (The main job continues the templates
   on its test texts only; here every row covers every text.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from timing import assert_same_output, load_average, speedup, time_calls

MAX_LENGTH = 512
MEMORY_MAX_LENGTH = 64
FEATURE_TOLERANCE = {"rtol": 1e-4}  # max|ours − HF| ≤ 1e-4 · max|HF| (float32, 12 layers, different kernels)
BF16_TOLERANCE = {"rtol": 0.1}  # max|f_bf16 − f_f32| ≤ 0.1 · max|f_f32| (bf16 keeps 8 bits; 30 layers)
KV_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}  # summed log-probs, float32, the same model two ways
ONE_PASS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}  # float32 features, the same model two ways


def _texts(n: int) -> list[str]:
    from sentcomp.data.rotten_tomatoes import read_snippets

    snippets = read_snippets().texts
    return [snippets[i % len(snippets)] for i in range(n)]


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
    return torch.cat(outputs)[np.argsort(order, kind="stable")]  # back to the given order


def throughput(n: int, batch_size: int, repeats: int, config=None) -> dict:
    """Ours vs HF PyTorch on the same weights and texts: features checked equal, then tokens/s of each.
    ``config``: the ``gpt2.GPT2Config`` of the random model (default GPT-2 small)."""
    import torch
    import transformers

    from sentcomp import features
    from sentcomp.data import text
    from sentcomp.models import gpt2

    texts = _texts(n)
    lm = gpt2.init(config or gpt2.gpt2_config("small"), rng=0)
    with tempfile.TemporaryDirectory() as directory:
        gpt2.save_hf(lm, directory)
        model = transformers.GPT2LMHeadModel.from_pretrained(directory).transformer.eval()
    n_tokens = sum(len(ids) for ids in text.encode_texts(lm.tokenizer, texts, MAX_LENGTH).token_ids)
    tokenizer = lm.tokenizer  # the same real GPT-2 tokenizer
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    outputs = {}
    runs = {
        "sentcomp_jax": lambda: features.extract_features(lm, texts, ("f",), batch_size=batch_size,
                                                          max_length=MAX_LENGTH, progress=False)["f"],
        "hf_torch_given_order": lambda: _hf_pass(model, tokenizer, texts, batch_size, False),
        "hf_torch_length_sorted": lambda: _hf_pass(model, tokenizer, texts, batch_size, True),
    }
    results = {"n_texts": n, "batch_size": batch_size, "real_tokens": n_tokens,
               "torch_threads": torch.get_num_threads()}

    def recorded(name):
        def call():
            outputs[name] = np.asarray(runs[name]())
        return call

    timings = {name: time_calls(recorded(name), repeats) for name in runs}
    for name in ("hf_torch_given_order", "hf_torch_length_sorted"):
        assert_same_output(f"f(s) of {name} vs sentcomp", outputs["sentcomp_jax"], outputs[name], **FEATURE_TOLERANCE)
    for name, timing in timings.items():
        results[name] = {"seconds": round(timing.median, 3), "tokens_per_s": round(n_tokens / timing.median, 1)}
        print(f"{name:24s} {n_tokens / timing.median:9.1f} tokens/s  ({timing.median:.2f} s; {load_average()})",
              flush=True)
    best_hf = min(timings["hf_torch_given_order"].median, timings["hf_torch_length_sorted"].median)
    results["ratio_vs_best_hf"] = round(speedup(best_hf, timings["sentcomp_jax"].median), 3)
    results["ratio_vs_hf_given_order"] = round(
        speedup(timings["hf_torch_given_order"].median, timings["sentcomp_jax"].median), 3)
    return results


def _smollm2():
    from sentcomp import models

    return models.load("smollm2-135m")


def dtype_ratio(n: int, batch_size: int, repeats: int) -> dict:
    """f(s) of ``n`` snippets with SmolLM2-135M in float32 and in bfloat16: checked close, then timed alike."""
    from sentcomp import features
    from sentcomp.data import text

    lm, texts = _smollm2(), _texts(n)
    n_tokens = sum(len(ids) for ids in text.encode_texts(lm.tokenizer, texts, MAX_LENGTH).token_ids)
    outputs = {}

    def run(dtype):
        def call():
            outputs[dtype] = features.extract_features(lm, texts, ("f",), batch_size=batch_size, max_length=MAX_LENGTH,
                                                       compute_dtype=dtype, progress=False)["f"]
        return call

    timings = {dtype: time_calls(run(dtype), repeats) for dtype in ("float32", "bfloat16")}
    worst = assert_same_output("f(s) in bfloat16 vs float32", outputs["bfloat16"], outputs["float32"], **BF16_TOLERANCE)
    results = {"model": lm.name, "n_texts": n, "batch_size": batch_size, "real_tokens": n_tokens,
               "relative_difference": round(worst, 4)}
    for dtype, timing in timings.items():
        results[dtype] = {"seconds": round(timing.median, 3), "tokens_per_s": round(n_tokens / timing.median, 1)}
        print(f"f(s) {dtype:9s} {n_tokens / timing.median:9.1f} tokens/s  ({timing.median:.2f} s; {load_average()})",
              flush=True)
    results["bf16_over_f32"] = round(speedup(timings["bfloat16"].median, timings["float32"].median) ** -1, 3)
    print(f"bfloat16 / float32 speed: {results['bf16_over_f32']:.2f}× (f(s) max difference "
          f"{worst:.3%} of max|f|)", flush=True)
    return results


def two_ways(timings: dict, names: tuple[str, str]) -> dict:
    """``{<name>_seconds}`` of the two ways ``timings[True]`` (the fast one, ``names[0]``) and ``timings[False]``,
    and ``speedup`` = the second's median / the first's."""
    return {f"{names[0]}_seconds": round(timings[True].median, 3),
            f"{names[1]}_seconds": round(timings[False].median, 3),
            "speedup": round(speedup(timings[False].median, timings[True].median), 3)}


def kv_cache_ratio(n: int, batch_size: int, repeats: int, k: int = 2) -> dict:
    """The main job's k-shot pass with SmolLM2-135M, with and without the shared prefix's KV cache."""
    from sentcomp import zeroshot
    from sentcomp.data import get_task, load_task
    from sentcomp.data.text import demonstration_prefix, sample_demonstrations

    lm, task = _smollm2(), get_task("rotten_tomatoes")
    splits = load_task(task)
    train, texts = splits["train"], _texts(n)
    chosen = sample_demonstrations(train.texts, train.labels, k, 0, True, exclude=texts)
    words = [task.label_words[task.label_names[train.labels[i]]][0] for i in chosen]
    prefix = demonstration_prefix([train.texts[i] for i in chosen], words, task.prompt)
    label_words = zeroshot.label_word_list(task)[0]
    outputs = {}

    def run(cached):
        def call():
            outputs[cached] = zeroshot.score_words(lm, texts, task.prompt, label_words, prefix, batch_size=batch_size,
                                                   max_length=MAX_LENGTH, progress=False, kv_cache=cached).texts
        return call

    timings = {cached: time_calls(run(cached), repeats) for cached in (True, False)}
    worst = assert_same_output("k-shot scores with the KV cache vs without", outputs[True], outputs[False],
                               **KV_TOLERANCE)
    results = {"model": lm.name, "n_texts": n, "k": k, "prefix_chars": len(prefix), "max_relative_difference": worst,
               **two_ways(timings, ("cached", "uncached"))}
    print(f"{k}-shot scoring of {n} texts: uncached {timings[False].median:.2f} s, KV-cached "
          f"{timings[True].median:.2f} s: {results['speedup']:.2f}× (scores equal within {KV_TOLERANCE}; "
          f"{load_average()})", flush=True)
    return results


def one_pass_ratio(n: int, batch_size: int, repeats: int) -> dict:
    """The main job's rows (section 5 of the module docstring) with SmolLM2-135M: one pass vs row by row."""
    from sentcomp import features, zeroshot
    from sentcomp.data import get_task
    from sentcomp.data.text import encode_texts

    lm, task, texts = _smollm2(), get_task("rotten_tomatoes"), _texts(n)
    words = tuple(zeroshot.label_word_list(task)[0])
    requests = [features.RowRequest(("f", "phi_p_f", "word_logits"), None, words),
                features.RowRequest(("f", "phi_p_f", "word_log_probs"), task.prompt, words),
                *(features.RowRequest(("word_log_probs",), template, words) for template in task.prompt_templates[1:])]
    options = features.ExtractionOptions(max_length=MAX_LENGTH, batch_size=batch_size, progress=False)
    outputs = {}

    def run(one_pass):
        def call():
            outputs[one_pass] = (features.extract_rows(lm, texts, requests, options) if one_pass else [
                features.extract_features(lm, texts, r.kinds, words=r.words, prompt=r.prompt, options=options)
                for r in requests])
        return call

    timings = {one_pass: time_calls(run(one_pass), repeats) for one_pass in (True, False)}
    worst = max(assert_same_output(f"{kind} of the row {request.prompt!r}, one pass vs row by row", shared[kind],
                                   whole[kind], **ONE_PASS_TOLERANCE)
                for request, shared, whole in zip(requests, outputs[True], outputs[False]) for kind in request.kinds)
    row_tokens = sum(len(ids) for r in requests
                     for ids in encode_texts(lm.tokenizer, texts, MAX_LENGTH, r.prompt).token_ids)
    results = {"model": lm.name, "n_texts": n, "rows": [r.prompt for r in requests], "row_tokens": row_tokens,
               "continued_rows": [out["metadata"]["continued_rows"] for out in outputs[True]],
               "max_relative_difference": worst, **two_ways(timings, ("one_pass", "row_by_row"))}
    print(f"{len(requests)} rows of {n} texts ({row_tokens} tokens read row by row): row by row "
          f"{timings[False].median:.2f} s, one pass {timings[True].median:.2f} s: {results['speedup']:.2f}× "
          f"(every kind equal within {ONE_PASS_TOLERANCE}; {load_average()})", flush=True)
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
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up (median reported)")
    parser.add_argument("--memory-n", type=int, default=20_000, help="texts for the Φp_f memory check (0: skip)")
    parser.add_argument("--memory-case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", action="store_true", help="only: SmolLM2-135M f(s) in float32 vs bfloat16")
    parser.add_argument("--kv-cache", action="store_true", help="only: SmolLM2-135M 2-shot scoring, KV-cached vs not")
    parser.add_argument("--one-pass", action="store_true", help="only: SmolLM2-135M main-job rows, one pass vs not")
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_n, args.batch_size)))
        return
    if args.dtypes or args.kv_cache or args.one_pass:
        results = {"load_average": load_average()}
        if args.dtypes:
            results["dtypes"] = dtype_ratio(args.n, args.batch_size, args.repeats)
        if args.kv_cache:
            results["kv_cache"] = kv_cache_ratio(args.n, args.batch_size, args.repeats)
        if args.one_pass:
            results["one_pass"] = one_pass_ratio(args.n, args.batch_size, args.repeats)
        print(json.dumps(results, indent=2))
        return
    results = {"throughput": throughput(args.n, args.batch_size, args.repeats)}
    print(f"same features (within {FEATURE_TOLERANCE}); ratio sentcomp / best HF torch: "
          f"{results['throughput']['ratio_vs_best_hf']:.2f}× (vs HF in given order: "
          f"{results['throughput']['ratio_vs_hf_given_order']:.2f}×)", flush=True)
    if args.memory_n:
        results["memory_phi_p_f"] = [_run_memory_case(n, args.batch_size) for n in (args.memory_n // 10, args.memory_n)]
        for m in results["memory_phi_p_f"]:
            print(f"Φp_f over {m['n_texts']:6d} texts: peak RSS rise {m['peak_rss_rise_mb']:7.1f} MB (measured); "
                  f"a materialised N×V float32 softmax would be {m['n_by_v_float32_mb']:8.1f} MB (computed, not "
                  f"measured); result N×d {m['n_by_d_result_mb']} MB; {m['seconds']} s", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
