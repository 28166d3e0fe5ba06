"""The statistics the tables report (pure numpy): a binomial proportion's Wilson interval, macro-F1, and calibration
metrics of a classifier's predicted label distribution.

**Wilson score interval** (Wilson 1927) of a proportion ``p̂ = successes / n`` at normal quantile ``z``:
``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``.

**Macro-F1** over classes: the mean over the classes present of ``F1 = 2·TP / (#true + #predicted)``.

**Calibration**, for ``N`` examples, ``K`` labels, predicted probabilities ``p ∈ [0, 1]^{N×K}`` (rows sum to
one) and gold labels ``y``:

- **Expected calibration error** (Naeini et al. 2015; Guo et al. 2017): the confidence ``c_i = max_k p_ik``
  and the correctness ``a_i = [argmax_k p_ik = y_i]`` of each example; ``M`` equal-width bins
  ``B_m = {i : c_i ∈ ((m−1)/M, m/M]}`` (``c_i = 0`` falls in the first);
  ``ECE = Σ_m |B_m|/N · |mean_{B_m} a − mean_{B_m} c|``.
- **Brier score** (Brier 1950, multi-class form): ``(1/N) Σ_i Σ_k (p_ik − [k = y_i])²``, in ``[0, 2]``
  (0 = certain and right; a uniform guess over ``K`` labels scores ``1 − 1/K``).
"""

from __future__ import annotations

import math

import numpy as np

from sentcomp.errors import SentcompError

DEFAULT_BINS = 10
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%


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


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``successes / n`` (95% for the default ``z``):
    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0, got {n}.")
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """sklearn's ``f1_score(labels, predictions, average="macro")`` for class indices: the mean over the classes
    present in ``labels`` or ``predictions`` of ``F1 = 2·TP / (2·TP + FP + FN) = 2·TP / (#true + #predicted)``."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    size = int(max(labels.max(), predictions.max())) + 1
    true_count = np.bincount(labels, minlength=size)
    predicted_count = np.bincount(predictions, minlength=size)
    true_positives = np.bincount(labels[labels == predictions], minlength=size)
    present = (true_count + predicted_count) > 0
    return float(np.mean(2.0 * true_positives[present] / (true_count + predicted_count)[present]))
