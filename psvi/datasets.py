"""Dataset loaders (NumPy only). Nothing here downloads: data are shipped with a
package (scikit-learn's digits) or read from a local folder."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """A train/test split of standardized inputs and targets."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn).

    Pixels are scaled to [0, 1] then standardized with the training mean and std;
    the split is a seeded stratified-free random permutation.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = data.data.astype(np.float32) / 16.0
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    num_test = int(round(test_fraction * len(y)))
    test, train = order[:num_test], order[num_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return Split(x[train], y[train], x[test], y[test])
