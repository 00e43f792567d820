"""Evaluation metrics (NumPy only): Gaussian KL, classification NLL, accuracy, ECE."""

from __future__ import annotations

import numpy as np


def gaussian_kl(mean0: np.ndarray, cov0: np.ndarray, mean1: np.ndarray, cov1: np.ndarray) -> float:
    """``KL(N(mean0, cov0) || N(mean1, cov1))`` in float64.

    The forward KL of the project's Gaussian targets is ``gaussian_kl(target, q)``.
    """
    mean0, mean1 = np.asarray(mean0, np.float64), np.asarray(mean1, np.float64)
    cov0, cov1 = np.asarray(cov0, np.float64), np.asarray(cov1, np.float64)
    chol1 = np.linalg.cholesky(cov1)
    m = np.linalg.solve(chol1, np.linalg.cholesky(cov0))
    z = np.linalg.solve(chol1, mean1 - mean0)
    logdet1 = 2 * np.sum(np.log(np.diag(chol1)))
    logdet0 = np.linalg.slogdet(cov0)[1]
    return float(0.5 * (np.sum(m**2) + np.sum(z**2) - mean0.size + logdet1 - logdet0))


def predictive_probs(sample_probs: np.ndarray) -> np.ndarray:
    """Posterior predictive class probabilities: the mean over draws (axis 0)."""
    return np.mean(np.asarray(sample_probs, np.float64), axis=0)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log predictive probability of the true labels."""
    probs = np.asarray(probs, np.float64)
    picked = probs[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(picked, 1e-300, None))))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of argmax predictions equal to the labels."""
    return float(np.mean(np.argmax(probs, axis=-1) == np.asarray(labels)))


def ece(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Expected calibration error with ``num_bins`` equal-width confidence bins."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=-1)
    correct = np.argmax(probs, axis=-1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def classification_report(sample_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, NLL and ECE of the posterior predictive from per-draw probabilities."""
    probs = predictive_probs(sample_probs)
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}
