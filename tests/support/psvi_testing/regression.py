"""Data for a linear regression with unit noise (reliability tests of both backends)."""

import numpy as np


def regression_data(n: int = 60, dim: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (n, dim) and ``y = x @ (1, ..., dim) + N(0, 1)`` noise, float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x, (x @ np.arange(1.0, dim + 1) + rng.normal(size=n)).astype(np.float32)
