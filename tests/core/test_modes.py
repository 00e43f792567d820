"""The mode search against densities known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from psvi.modes import search_modes, uncovered_message

MODES = np.array([[-4.0, -4.0], [4.0, 4.0]])
SD = 0.5


def _mixture_log_p_and_score(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An equal mixture of N(MODES[k], SD^2 I), k = 0, 1 (unnormalized), and its score."""
    diff = u[:, None, :] - MODES[None]  # (m, 2 modes, D)
    logs = -0.5 * np.sum(diff**2, -1) / SD**2
    log_p = np.logaddexp(logs[:, 0], logs[:, 1])
    resp = np.exp(logs - log_p[:, None])
    return log_p, -np.sum(resp[..., None] * diff, 1) / SD**2


def _gaussian(mean: np.ndarray, sd: float):
    rng = np.random.default_rng(1)
    draws = mean + sd * rng.normal(size=(1000, 2))
    return draws, lambda u: stats.multivariate_normal(mean, sd**2).logpdf(u)


def test_a_guide_on_one_of_two_modes_is_flagged_at_the_other():
    draws, log_q = _gaussian(MODES[1], SD)  # exact on the mode at (4, 4), blind to (-4, -4)
    report = search_modes(draws, log_q, _mixture_log_p_and_score)
    assert report.num_uncovered >= 1
    # Every flagged end point is the missed mode (Adam's last steps jitter ~0.1 sd).
    np.testing.assert_allclose(report.uncovered, np.broadcast_to(MODES[0], report.uncovered.shape), atol=0.2)
    assert "misses posterior mass" in uncovered_message(report, "AutoNormal")


def test_a_guide_covering_every_mode_is_not_flagged():
    rng = np.random.default_rng(2)
    draws = MODES[rng.integers(0, 2, 1000)] + SD * rng.normal(size=(1000, 2))

    def log_q(u):  # the target itself, normalized
        return _mixture_log_p_and_score(u)[0] - np.log(2 * np.pi * SD**2) - np.log(2)

    assert search_modes(draws, log_q, _mixture_log_p_and_score).num_uncovered == 0


def test_an_exact_gaussian_fit_is_not_flagged():
    mean = np.array([1.0, -2.0])

    def log_p_and_score(u):
        return -0.5 * np.sum((u - mean) ** 2, -1) / 0.3**2, -(u - mean) / 0.3**2

    draws, log_q = _gaussian(mean, 0.3)
    assert search_modes(draws, log_q, log_p_and_score).num_uncovered == 0


def test_too_few_draws_are_refused_by_name():
    with pytest.raises(ValueError, match="num_searches=32"):
        search_modes(np.zeros((10, 2)), lambda u: u[:, 0], _mixture_log_p_and_score)
