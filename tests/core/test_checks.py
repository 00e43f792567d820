"""``psvi.checks.rising_loss_message``: the warning after a run whose -ELBO estimates rose."""

import numpy as np
import pytest

from psvi.checks import MIN_LOSSES_FOR_TREND, rising_loss_message


def _settling(rng, num, noise):
    """A fit that settles: -ELBO estimates falling as 50 e^(-t/200) toward 100, plus noise."""
    return 100 + 50 * np.exp(-np.arange(num) / 200) + noise(rng, num)


@pytest.mark.parametrize(
    "noise",
    [
        lambda rng, num: 3.0 * rng.normal(size=num),
        lambda rng, num: 3.0 * rng.standard_t(2, size=num),  # heavy tails: infinite variance
        lambda rng, num: np.where(rng.random(num) < 0.05, np.nan, rng.normal(size=num)),  # rejections
    ],
    ids=["gaussian", "student_t2", "rejections"],
)
def test_a_fit_that_settles_is_not_warned_about(noise):
    # 2,000 losses in windows of 200: a settled window's median has a standard error of
    # ~1.25 sd / sqrt(200) ~ 0.09 sd (t(2): its median is as well determined), and the
    # rule asks for a rise of twice the best window's spread, ~2 sd: over 20 standard
    # errors, which noise does not make in 100 runs (nor the last window's remaining
    # decay, 50 e^-9 ~ 0.006).
    for seed in range(100):
        assert rising_loss_message("E", _settling(np.random.default_rng(seed), 2000, noise)) is None


def test_a_drifting_fit_is_warned_about_and_the_message_names_the_windows():
    # The failing flow of docs/guides.md: the -ELBO estimate 2,500 rising to ~8,000.
    rng = np.random.default_rng(0)
    losses = 2500 + 3 * np.arange(2000) + 300 * rng.normal(size=2000)
    message = rising_loss_message("ProximalScoreVI", losses)
    assert message is not None
    assert "ProximalScoreVI's -ELBO estimate rose" in message and "last 200 updates" in message
    assert "over updates 1-200" in message and "flow guide" in message


def test_one_spike_or_a_rise_under_one_nat_is_not_a_trend():
    rng = np.random.default_rng(1)
    losses = 100 + 0.1 * rng.normal(size=1000)
    losses[-5] = 1e6  # one heavy-tailed estimate: the medians do not see it
    assert rising_loss_message("E", losses) is None
    small = 10 + np.linspace(0, 0.5, 1000) + 1e-3 * rng.normal(size=1000)  # 0.5 nats
    assert rising_loss_message("E", small) is None
    assert rising_loss_message("E", 10 + np.linspace(0, 2.5, 1000) + 1e-3 * rng.normal(size=1000))


def test_short_or_mostly_rejected_runs_are_not_judged():
    assert rising_loss_message("E", np.arange(MIN_LOSSES_FOR_TREND - 1.0) * 100) is None
    losses = np.arange(1000.0) * 100
    losses[-60:] = np.nan  # the last window mostly rejected: run's rejection checks speak
    assert rising_loss_message("E", losses) is None
