"""PSIS k-hat of a VI fit's log weights (``psvi.inference_data.pareto_khat``)."""

import numpy as np

from psvi.inference_data import CONSTANT_LOG_WEIGHTS, pareto_khat


def test_log_weights_constant_to_round_off_have_no_tail():
    # An exact fit in float32: log p - log q is the log evidence (-98 here) plus round-off
    # of ~1e-5 nats, whose Pareto fit can give anything (inf on such a draw).
    rng = np.random.default_rng(0)
    log_weights = -98.05 + np.float32(1e-5) * rng.standard_normal(300)
    assert pareto_khat(log_weights) == float("-inf")
    assert pareto_khat(log_weights + np.linspace(0.0, 0.5 * CONSTANT_LOG_WEIGHTS, 300)) == float("-inf")


def test_light_and_heavy_tails_are_told_apart():
    rng = np.random.default_rng(0)
    # Weights ~ Pareto with shape xi (log w exponential with mean xi) have k = xi; 4,000
    # draws estimate it to about +-0.1 (Vehtari et al. 2024, PSIS, section 3).
    heavy = rng.exponential(1.0, size=4000)
    assert pareto_khat(heavy) > 0.7
    # Gaussian log weights with sd 0.3 (a close fit): lognormal weights, k-hat well below 0.5.
    light = 0.3 * rng.standard_normal(4000)
    assert pareto_khat(light) < 0.5
