"""Regression with a learned noise scale: the variational-EM fixed point (type-II
maximum likelihood) and the checks made on both backends' fits."""

import numpy as np
import pytest
from scipy import optimize, stats

from psvi.contrib.targets import conjugate_linear_regression

N, D = 100, 3


UPDATES = 1500


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    return x, (x @ np.array([1.0, -2.0, 0.5]) + 0.7 * rng.normal(size=N)).astype(np.float32)


def type2_ml_sigma(x, y) -> float:
    def neg_log_evidence(log_sigma):
        cov = x @ x.T + np.exp(2 * log_sigma) * np.eye(N)
        return -stats.multivariate_normal.logpdf(y, np.zeros(N), cov)

    return float(np.exp(optimize.minimize_scalar(neg_log_evidence, bounds=(-3, 2), method="bounded").x))


def check(sigmas, loc, cov, x, y):
    """``sigmas``: the learned scale over the updates; ``loc, cov``: the final guide."""
    sigma = float(np.mean(sigmas[UPDATES // 2 :]))
    # The averaged iterates' standard error is <= 0.002 here (sd <= 0.008 over 750
    # autocorrelated updates, >= 20 effective): 5 of them, rounded up, is 0.01, a fifth
    # of sigma's own statistical uncertainty (sigma / sqrt(2 N) = 0.045).
    assert sigma == pytest.approx(type2_ml_sigma(x, y), abs=0.01)
    exact_mean, exact_cov = conjugate_linear_regression(x, y, prior_scale=1.0, noise_scale=sigma)
    sd = np.sqrt(np.diag(exact_cov))
    assert np.all(np.abs(loc - exact_mean) < 0.1 * sd)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), sd, rtol=0.05)
