"""Calibration metrics of a classifier's predicted label distribution (pure numpy).

For ``N`` examples, ``K`` labels, predicted probabilities ``p ∈ [0, 1]^{N×K}`` (rows sum to one) and gold labels
``y``:

- **Expected calibration error** (Naeini et al. 2015; Guo et al. 2017): the confidence ``c_i = max_k p_ik``
  and the correctness ``a_i = [argmax_k p_ik = y_i]`` of each example; ``M`` equal-width bins
  ``B_m = {i : c_i ∈ ((m−1)/M, m/M]}`` (``c_i = 0`` falls in the first);
  ``ECE = Σ_m |B_m|/N · |mean_{B_m} a − mean_{B_m} c|``.
- **Brier score** (Brier 1950, multi-class form): ``(1/N) Σ_i Σ_k (p_ik − [k = y_i])²``, in ``[0, 2]``
  (0 = certain and right; a uniform guess over ``K`` labels scores ``1 − 1/K``).
"""

from __future__ import annotations

import numpy as np

from sentcomp.errors import SentcompError

DEFAULT_BINS = 10


def softmax(scores: np.ndarray) -> np.ndarray:
    """``p_ik = exp(s_ik) / Σ_j exp(s_ij)``, computed stably in float64: label scores → a distribution per row."""
    scores = np.asarray(scores, np.float64)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _check(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    if probabilities.ndim != 2 or labels.shape != probabilities.shape[:1] or not len(labels):
        raise SentcompError(f"Calibration metrics need probabilities [N, K] and labels [N] with N > 0; got shapes "
                            f"{probabilities.shape} and {labels.shape}.")
    if labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise SentcompError(f"Labels must be in [0, {probabilities.shape[1]}), got {labels.min()}..{labels.max()}.")
    return probabilities, labels


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """ECE over ``n_bins`` equal-width confidence bins (module docstring)."""
    probabilities, labels = _check(probabilities, labels)
    if n_bins < 1:
        raise SentcompError(f"ECE needs at least one bin, got n_bins={n_bins}.")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)  # edges[m] < c ≤ edges[m+1]
    error = 0.0
    for m in np.unique(bins):
        members = bins == m
        error += members.sum() / len(labels) * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score ``mean_i Σ_k (p_ik − [k = y_i])²`` (module docstring)."""
    probabilities, labels = _check(probabilities, labels)
    onehot = np.eye(probabilities.shape[1])[labels]
    return float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))
