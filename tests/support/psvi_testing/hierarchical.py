"""A hierarchical target with one local latent per data point whose posterior is exact
under a mean-field Gaussian guide (the local-latent tests of both backends)."""

import numpy as np

N, B = 40, 10


def hierarchical_data() -> tuple[np.ndarray, np.ndarray]:
    """``y`` (the locals' data) and ``w`` (the global's data), float32, fixed seed."""
    rng = np.random.default_rng(0)
    return (2 * rng.normal(size=N)).astype(np.float32), (1.5 + rng.normal(size=N)).astype(np.float32)


def exact_posterior(y: np.ndarray, w: np.ndarray) -> dict[str, tuple]:
    """``{site: (loc, sd)}`` in unconstrained space. Independent blocks: z_i | y_i ~
    N(y_i / 2, 1/2); log s_i ~ N(0.5, 0.5^2) (prior only, exact in unconstrained space
    with the log-Jacobian); mu | w ~ N(sum w / P, 1 / P) with P = N + 1/100."""
    precision = N + 0.01
    return {
        "z": (np.asarray(y, np.float64) / 2, np.full(N, 0.5**0.5)),
        "s": (np.full(N, 0.5), np.full(N, 0.5)),
        "mu": (float(np.sum(w, dtype=np.float64)) / precision, precision**-0.5),
    }
