"""Shared metrics and plots against hand-computed cases."""

import numpy as np
import pytest

from psvi import metrics
from psvi.contrib.plots import plot_reliability

PROBS = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
LABELS = np.array([0, 1, 1, 0])


def test_classification_metrics_by_hand():
    # Brier: (0.01+0.01) + (0.36+0.36) + (0.04+0.04) + (0.3025+0.3025), mean of 4.
    assert metrics.brier(PROBS, LABELS) == pytest.approx((0.02 + 0.72 + 0.08 + 0.605) / 4)
    assert metrics.accuracy(PROBS, LABELS) == 0.5
    assert metrics.nll(PROBS, LABELS) == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.45])))
    # Two bins: (0.5, 1] holds every point here (confidences 0.9, 0.6, 0.8, 0.55).
    bins = metrics.reliability_bins(PROBS, LABELS, num_bins=2)
    assert list(bins["count"]) == [0, 4]
    assert bins["confidence"][1] == pytest.approx(np.mean([0.9, 0.6, 0.8, 0.55]))
    assert bins["accuracy"][1] == 0.5
    assert metrics.ece(PROBS, LABELS, num_bins=2) == pytest.approx(0.7125 - 0.5)


def test_regression_and_forecast_metrics_by_hand():
    draws = np.array([[1.0, 2.0], [3.0, 4.0]])  # 2 draws x 2 points
    targets = np.array([2.0, 2.0])
    assert metrics.rmse(draws, targets) == pytest.approx(np.sqrt((0.0 + 1.0) / 2))
    # One draw, unit scale: the test log-likelihood is the Gaussian log density.
    ll = metrics.gaussian_test_log_likelihood(np.array([[0.0, 1.0]]), 1.0, np.array([0.0, 0.0]))
    assert ll == pytest.approx(np.mean([-0.5 * np.log(2 * np.pi), -0.5 - 0.5 * np.log(2 * np.pi)]))
    # CRPS of the ensemble {0, 1, 3} at y = 1.5: E|X - y| - E|X - X'| / 2 = 5/3 - 7/6 = 0.5.
    assert metrics.crps(np.array([[0.0], [1.0], [3.0]]), np.array([1.5])) == pytest.approx(0.5)
    ensemble = np.linspace(0.0, 1.0, 101)[:, None]
    assert metrics.interval_coverage(ensemble, np.array([0.5, 0.99]), level=0.9) == 0.5


def test_reliability_diagram_is_written(tmp_path):
    path = tmp_path / "reliability.png"
    plot_reliability(metrics.reliability_bins(PROBS, LABELS, 5), "test", str(path))
    assert path.stat().st_size > 1000


def test_paired_bootstrap_error_of_a_mean_difference_is_its_standard_error():
    # The NLL difference is a mean over points of d_i = log p_b(y_i) - log p_a(y_i), so its
    # bootstrap standard error is sd(d) / sqrt(n) up to the bootstrap's own Monte Carlo
    # error, a relative 1 / sqrt(2 * 999) = 2.2% for 1000 resamples: 10% is 4.5 of those.
    rng = np.random.default_rng(0)
    n = 2000
    labels = rng.integers(0, 3, n)
    probs_a, probs_b = (rng.dirichlet(np.ones(3), n) for _ in range(2))
    diff, se = metrics.paired_bootstrap(metrics.nll, probs_a, probs_b, labels)
    rows = np.arange(n)
    d = np.log(probs_b[rows, labels]) - np.log(probs_a[rows, labels])
    assert diff == pytest.approx(metrics.nll(probs_a, labels) - metrics.nll(probs_b, labels))
    assert se == pytest.approx(np.std(d, ddof=1) / np.sqrt(n), rel=0.1)
    # Paired: a method against itself differs by exactly 0 in every resample.
    assert metrics.paired_bootstrap(metrics.ece, probs_a, probs_a, labels) == (0.0, 0.0)
