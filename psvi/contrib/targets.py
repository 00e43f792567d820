"""Test targets with exact posteriors (NumPy only)."""

from __future__ import annotations

import numpy as np


def ill_conditioned_gaussian(
    dim: int, condition: float, seed: int = 0, diagonal: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a Gaussian with eigenvalues log-spaced over ``condition``.

    Eigenvalues run from ``condition**-0.5`` to ``condition**0.5`` (geometric mean 1);
    the eigenvectors are a random rotation unless ``diagonal``.
    """
    rng = np.random.default_rng(seed)
    eig = np.logspace(-0.5, 0.5, dim) ** np.log10(condition)
    rng.shuffle(eig)
    mean = rng.normal(size=dim)
    if diagonal:
        return mean, np.diag(eig)
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))
    cov = (q * eig) @ q.T
    return mean, 0.5 * (cov + cov.T)


def conjugate_linear_regression(
    x: np.ndarray, y: np.ndarray, prior_scale: float, noise_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean and covariance of ``w ~ N(0, prior_scale^2 I)``, ``y ~ N(Xw, noise^2)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    precision = x.T @ x / noise_scale**2 + np.eye(x.shape[1]) / prior_scale**2
    cov = np.linalg.inv(precision)
    mean = cov @ x.T @ y / noise_scale**2
    return mean, 0.5 * (cov + cov.T)
