"""Earnings on height in dollars, a regression far from unit scale (both backends' far-start
tests), and its flat-prior posterior."""

import numpy as np

NUM = 1059


def earnings_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Heights (inches) and earnings (dollars) of PosteriorDB's earnings size and scale."""
    rng = np.random.default_rng(seed)
    height = rng.normal(66.6, 3.8, NUM)
    return height, -61000 + 1300 * height + rng.normal(0, 19000, NUM)


def earnings_posterior(height: np.ndarray, earn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means and sds of (intercept, slope, log sigma) under flat priors: the coefficients'
    Student-t (least-squares mean, covariance ``s^2 (X'X)^-1 (N-2)/(N-4)``), and log sigma
    ~ log s with sd ``1/sqrt(2N)`` (its Gaussian limit; the error is O(1/N) of an sd)."""
    design = np.column_stack([np.ones(len(height)), height])
    coef, rss = np.linalg.lstsq(design, earn, rcond=None)[:2]
    dof = len(height) - 2
    s2 = rss[0] / dof
    coef_cov = s2 * np.linalg.inv(design.T @ design) * dof / (dof - 2)
    mean = np.append(coef, 0.5 * np.log(s2))
    return mean, np.append(np.sqrt(np.diag(coef_cov)), 1 / np.sqrt(2 * len(height)))
