"""Regenerates docs/theory.md's "What to expect" table: the theory's quantities for an analytic "model".

The model mixes the true next-word distribution with the uniform one, ``p_f = (1−α) p* + α/V``, as a softmax
LM with ``Φ = I`` and ``f(s) = log p_f(·|s)`` (so ``softmax(Φ f) = p_f`` exactly), on the default synthetic
language (``make_language(0)``). Every column comes from ``sentcomp.theory.evaluate_against_truth`` with the
theory experiment's settings (half the documents fit the probes and the natural classifiers, C chosen by
held-out logistic loss).

    .venv/bin/python docs/scripts/theory_mixture.py                  # the table in docs/theory.md (~1 min)
    .venv/bin/python docs/scripts/theory_mixture.py --documents 200 --alphas 0.5,0.01
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from sentcomp import theory
from sentcomp.data import synthetic


def mixture_model(log_p_star: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``(f [..., V], Φ = I [V, V])`` with ``softmax(Φ f) = (1−α) p* + α/V``."""
    vocab_size = log_p_star.shape[-1]
    p_f = (1.0 - alpha) * np.exp(log_p_star) + alpha / vocab_size
    return np.log(p_f).astype(np.float32), np.eye(vocab_size, dtype=np.float32)


def table(alphas, num_documents: int, seed: int = 0) -> str:
    """The markdown table (a header line naming τ and the truth's probe accuracy, then one row per α)."""
    language = synthetic.make_language(0)
    data = synthetic.task_dataset(language, jax.random.key(seed), num_documents)
    log_p_star = np.asarray(data.truth.log_next, np.float64)
    labels, gamma = np.asarray(data.labels), synthetic.task_coverage(language)
    rows = []
    for alpha in alphas:
        features, phi = mixture_model(log_p_star, alpha)
        result = theory.evaluate_against_truth(features, phi, log_p_star, labels, gamma, seed=seed,
                                               probe_cv_metric="loss")
        p_f = result["features"]["p_f"]
        rows.append(f"| {alpha:g} | {result['epsilon']['mean']:.2g} | {result['epsilon_task']['mean']:.2g} | "
                    f"{p_f['bound']:.3f} (B = {p_f['norm']:.3g}) | {p_f['bound_task_epsilon']:.3f} | "
                    f"{p_f['plug_in']:.3f} | {p_f['probe']['loss']:.3f} |")
    truth = result["features"]["p_star"]["probe"]
    header = (f"L = {language.body_length}, γ = {gamma:.3g}, τ = {result['tau']['box']:.3f}, probe on p*: loss "
              f"{truth['loss']:.3f}, accuracy {100 * truth['accuracy']:.1f}%, {num_documents} documents\n\n"
              "| α | ε (p_L) | ε (task contexts) | bound on p_f (B attaining it) | bound with task ε, γ = 1 | "
              "plug-in loss | probe on p_f (loss) |\n|---|---|---|---|---|---|---|")
    return "\n".join([header, *rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--alphas", default="0.5,0.1,0.01,0.001", help="comma-separated mixing weights α")
    parser.add_argument("--seed", type=int, default=0, help="documents' sampling seed and the probes' CV seed")
    args = parser.parse_args()
    print(table([float(a) for a in args.alphas.split(",")], args.documents, args.seed))


if __name__ == "__main__":
    main()
