"""One multiple-choice task through lm-evaluation-harness: its own ``hf`` backend (PyTorch, CPU) vs ``sentcomp``.

    .venv/bin/python benchmarks/lmeval.py                # SmolLM2-135M, 100 Rotten Tomatoes test snippets
    .venv/bin/python benchmarks/lmeval.py --n 20 --batch-size 8

The task is a local lm-eval YAML written to a temporary folder (``dataset_path: json`` over the first ``--n``
snippets of sentcomp's offline Rotten Tomatoes test split, ``"{{text}} This movie is"`` → `` terrible`` /
`` great``, metrics acc and acc_norm). The model is the offline SmolLM2-135M-Instruct GGUF file: lm-eval's ``hf``
backend loads it through transformers' own GGUF import (``pretrained=<folder>, gguf_file=<file>``, float32), the
``sentcomp`` backend through ``sentcomp.models.load`` (float32; the same dequantised weights). Both run with the
same batch size on the same CPU cores (torch gets as many threads as XLA's CPU client uses).

Each backend's model is built once (not timed); ``simple_evaluate`` then runs once to warm up (JAX compiles its
length buckets) and once timed. Before any time is printed, the two runs must agree: every request's
log-likelihood within ``LL_TOLERANCE`` and the same acc and acc_norm. Printed: both times, the ratio
``hf / sentcomp``, the largest log-likelihood difference, and the load average.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import cores, format_ratio, load_average, speedup

import sentcomp.lmeval  # noqa: F401  (registers the "sentcomp" model)
from sentcomp.data.rotten_tomatoes import load_rotten_tomatoes
from sentcomp.models import gguf_loader

LL_TOLERANCE = 1e-4  # per-request log-likelihood (issue 35's bound; measured 1.7e-05 at --n 20, 2026-12-05)


def write_task(folder: Path, n: int) -> Path:
    """The local task YAML over the first ``n`` test snippets (and 2·n training snippets, so Table 1 takes it)."""
    splits = load_rotten_tomatoes()
    for split, count in (("train", 2 * n), ("test", n)):
        rows = [{"text": text, "label": int(label)}
                for text, label in zip(splits[split].texts[:count], splits[split].labels[:count])]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / "rt_lmeval.yaml"
    path.write_text(
        "task: rt_lmeval\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {folder / 'train.jsonl'}\n    test: {folder / 'test.jsonl'}\n"
        "training_split: train\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{text}} This movie is\"\ndoc_to_choice: [\"terrible\", \"great\"]\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return path


def run(lm, task_dir: Path, batch_size: int) -> tuple[dict, float]:
    """``simple_evaluate`` of the task with model object ``lm``; its results and wall time."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=["rt_lmeval"], log_samples=True, batch_size=batch_size,
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return results, time.perf_counter() - start


def log_likelihoods(results: dict) -> np.ndarray:
    """``[documents, choices]`` log-likelihoods in document order."""
    samples = sorted(results["samples"]["rt_lmeval"], key=lambda sample: sample["doc_id"])
    return np.array([[resp[0][0] for resp in sample["resps"]] for sample in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="test documents")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from lm_eval.api.registry import get_model

    from sentcomp.lmeval.model import SentcompLM

    torch.set_num_threads(cores())
    gguf = Path(gguf_loader.smollm2_135m_path())
    with tempfile.TemporaryDirectory() as folder:
        task_dir = Path(folder)
        write_task(task_dir, args.n)
        backends = {
            "hf": get_model("hf")(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32", device="cpu",
                                  batch_size=args.batch_size),
            "sentcomp": SentcompLM("smollm2-135m", dtype="float32", batch_size=args.batch_size, progress=False),
        }
        results, seconds = {}, {}
        for name, lm in backends.items():
            run(lm, task_dir, args.batch_size)  # warm-up: compilation, allocator, dataset cache
            results[name], seconds[name] = run(lm, task_dir, args.batch_size)
    ours, reference = log_likelihoods(results["sentcomp"]), log_likelihoods(results["hf"])
    difference = float(np.max(np.abs(ours - reference)))
    assert difference <= LL_TOLERANCE, f"log-likelihoods differ by up to {difference:.3g} > {LL_TOLERANCE}"
    for metric in ("acc,none", "acc_norm,none"):
        assert results["sentcomp"]["results"]["rt_lmeval"][metric] == results["hf"]["results"]["rt_lmeval"][metric]
    accuracy = results["hf"]["results"]["rt_lmeval"]
    print(f"SmolLM2-135M, {args.n} documents × 2 choices, batch {args.batch_size}, {cores()} cores, float32; "
          f"acc {accuracy['acc,none']:.3f}, acc_norm {accuracy['acc_norm,none']:.3f} (equal on both); "
          f"max |Δ log-likelihood| {difference:.2e}")
    print(f"hf (PyTorch) {seconds['hf']:.2f} s | sentcomp (JAX) {seconds['sentcomp']:.2f} s | hf / sentcomp "
          f"{format_ratio(speedup(seconds['hf'], seconds['sentcomp']))} | {load_average()}")


if __name__ == "__main__":
    main()
