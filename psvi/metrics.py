"""Evaluation metrics (NumPy only): Gaussian KL; classification NLL, accuracy, ECE,
reliability bins, Brier score, paired bootstrap differences; regression RMSE and test
log-likelihood; CRPS, interval coverage and width for forecasts (CRPS via
``scoringrules``)."""

from __future__ import annotations

from collections.abc import Callable

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


def reliability_bins(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> dict:
    """Per equal-width confidence bin: ``count``, mean ``confidence`` and ``accuracy``
    (NaN for empty bins) and the bin ``edges``; what ECE and a reliability diagram use."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=-1)
    correct = np.argmax(probs, axis=-1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(bins, confidence, num_bins) / count
        mean_acc = np.bincount(bins, correct.astype(np.float64), num_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": mean_acc}


def ece(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Expected calibration error with ``num_bins`` equal-width confidence bins."""
    bins = reliability_bins(probs, labels, num_bins)
    weight = bins["count"] / bins["count"].sum()
    gap = np.nan_to_num(np.abs(bins["accuracy"] - bins["confidence"]))
    return float(np.sum(weight * gap))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over points of ``sum_k (p_k - 1[y = k])^2``."""
    probs = np.asarray(probs, np.float64)
    onehot = np.eye(probs.shape[-1])[np.asarray(labels)]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def rmse(sample_means: np.ndarray, targets: np.ndarray) -> float:
    """Root mean squared error of the posterior predictive mean (draws on axis 0)."""
    prediction = np.mean(np.asarray(sample_means, np.float64), axis=0)
    return float(np.sqrt(np.mean((prediction - np.asarray(targets, np.float64)) ** 2)))


def gaussian_test_log_likelihood(
    sample_means: np.ndarray, sample_scales: np.ndarray | float, targets: np.ndarray
) -> float:
    """Mean over points of ``log (1/S) sum_s N(y | mean_s, scale_s^2)`` (draws on axis 0)."""
    means = np.asarray(sample_means, np.float64)
    scales = np.broadcast_to(np.asarray(sample_scales, np.float64), means.shape)
    z = (np.asarray(targets, np.float64) - means) / scales
    log_dens = -0.5 * z**2 - np.log(scales) - 0.5 * np.log(2 * np.pi)
    top = log_dens.max(axis=0)
    log_mean = top + np.log(np.mean(np.exp(log_dens - top), axis=0))
    return float(np.mean(log_mean))


def crps(samples: np.ndarray, targets: np.ndarray) -> float:
    """Mean CRPS of ensemble forecasts (draws on axis 0): ``scoringrules.crps_ensemble``,
    whose default equals the plug-in form ``E|X - y| - E|X - X'| / 2``."""
    import scoringrules

    samples = np.asarray(samples, np.float64)
    return float(np.mean(scoringrules.crps_ensemble(np.asarray(targets, np.float64), samples, m_axis=0)))


def interval_coverage(samples: np.ndarray, targets: np.ndarray, level: float = 0.9) -> float:
    """Fraction of targets inside the central ``level`` interval of the draws (axis 0)."""
    samples = np.asarray(samples, np.float64)
    lower, upper = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    targets = np.asarray(targets, np.float64)
    return float(np.mean((targets >= lower) & (targets <= upper)))


def interval_width(samples: np.ndarray, level: float = 0.9) -> float:
    """Mean width of the central ``level`` interval of the draws (axis 0)."""
    lower, upper = np.quantile(np.asarray(samples, np.float64), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return float(np.mean(upper - lower))


def forecast_report(point: np.ndarray, samples: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Forecast metrics: ``mse`` and ``mae`` of the point forecast ``point`` (the
    predictive mean), and from the predictive draws ``samples`` (axis 0) the ``crps``,
    the ``coverage_50`` / ``coverage_90`` of the central 50% / 90% intervals and
    ``width_90``; each a mean over all entries of ``targets``."""
    error = np.asarray(point, np.float64) - np.asarray(targets, np.float64)
    return {
        "mse": float(np.mean(error**2)),
        "mae": float(np.mean(np.abs(error))),
        "crps": crps(samples, targets),
        "coverage_50": interval_coverage(samples, targets, 0.5),
        "coverage_90": interval_coverage(samples, targets, 0.9),
        "width_90": interval_width(samples, 0.9),
    }


def paired_bootstrap(
    metric: Callable[[np.ndarray, np.ndarray], float],
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    num_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """``metric(probs_a) - metric(probs_b)`` on the test points and its bootstrap standard
    error: the points resampled with replacement, the same resample for both (paired), so
    the error is the test set's sampling noise of the difference (not the fits' own
    seed-to-seed variation)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(num_resamples):
        picked = rng.integers(0, len(labels), len(labels))
        differences.append(metric(probs_a[picked], labels[picked]) - metric(probs_b[picked], labels[picked]))
    return metric(probs_a, labels) - metric(probs_b, labels), float(np.std(differences, ddof=1))


def classification_report(sample_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, NLL and ECE of the posterior predictive from per-draw probabilities."""
    probs = predictive_probs(sample_probs)
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}
