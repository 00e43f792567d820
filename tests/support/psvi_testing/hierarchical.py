"""The hierarchical target of the local-latent tests of both backends (one local latent
per data point, exact under a mean-field Gaussian guide): ``psvi.contrib.targets``'
``hierarchical_data`` and ``hierarchical_posterior`` at N = 40, fitted with batches of B = 10."""

import numpy as np

from psvi.contrib.targets import hierarchical_data as _data
from psvi.contrib.targets import hierarchical_posterior

N, B = 40, 10


def hierarchical_data() -> tuple[np.ndarray, np.ndarray]:
    """``y`` (the locals' data) and ``w`` (the global's data), float32, fixed seed."""
    return _data(N)


exact_posterior = hierarchical_posterior
