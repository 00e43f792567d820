"""The target of the user-written-guide tests: a 3-d Gaussian site ``x`` and a LogNormal
site ``s``, and the AutoNormal-family params the hand-written guides start from."""

import numpy as np

from psvi.metrics import gaussian_kl

LOCS = {"a": [0.3, -0.2, 0.1], "s": [0.2], "p": [0.1, -0.3]}
SCALES = {"a": [0.5, 0.7, 1.1], "s": [0.4], "p": [0.6, 0.9]}

D = 3
_A = np.random.default_rng(0).normal(size=(D, D))
COV = _A @ _A.T / D + 0.3 * np.eye(D)
MEAN = np.array([1.0, -1.0, 0.5])


def target_kl(loc, tril) -> float:
    """KL(target || q) for the ``x`` site, closed form (float64)."""
    tril = np.asarray(tril, np.float64)
    return gaussian_kl(MEAN, COV, np.asarray(loc, np.float64), tril @ tril.T)
