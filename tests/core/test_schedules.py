"""The averaging schedules of psvi.schedules (backend-free): the running average's weights,
its restart rule and the closed-form step's budget by phase."""

import math

import numpy as np
import pytest

from psvi.schedules import (
    AVERAGE_RESTART_MARGIN,
    FAR_PHASE_GROWTH,
    PROGRESS_BUDGET_SCALE,
    SETTLED_AFTER,
    LossWindow,
    far_from_posterior,
    iterate_average_rate,
    progress_budget_scale,
    restarts_average,
)

EMPTY = LossWindow(math.inf, 0.0)


def _window(losses, errors):
    """The window after averaging in ``losses`` (standard errors ``errors``) from empty."""
    window, count = EMPTY, 0
    for loss, error in zip(losses, errors, strict=True):
        rate = iterate_average_rate(count)
        window, count = window.advanced(loss, error, rate, np.where), count + 1
    return window


def test_the_window_holds_the_weighted_mean_and_its_variance():
    """Iterate ``i`` carries a weight in proportion to ``i (i+1) ... (i+4)``
    (iterate_average_rate: ``6/(k+5)`` times the ``prod j/(j+6)`` of the later rates), so
    the window's mean is ``sum(w_i l_i)`` and the variance of that mean, for independent
    estimates, ``sum(w_i^2 e_i^2)``: computed directly here, to float64 rounding."""
    rng = np.random.default_rng(0)
    losses, errors = rng.normal(30.0, 2.0, 40), rng.uniform(0.5, 2.0, 40)
    rising = np.prod([np.arange(1, 41) + shift for shift in range(5)], axis=0).astype(float)
    weights = rising / rising.sum()
    window = _window(losses, errors)
    np.testing.assert_allclose(window.mean, weights @ losses, rtol=1e-12)
    np.testing.assert_allclose(window.variance, weights**2 @ errors**2, rtol=1e-12)


def test_the_average_starts_at_the_first_iterate_and_restarts_on_a_clear_fall_only():
    assert restarts_average(EMPTY, 1e30, 0.0)  # the first iterate starts the window
    window = _window([30.0] * 20, [1.0] * 20)
    sd = math.sqrt(1.0 + float(window.variance))  # the error of loss - window mean
    # A fall of just over / under the margin (in errors of the difference) restarts / does not.
    assert restarts_average(window, 30.0 - (AVERAGE_RESTART_MARGIN + 0.01) * sd, 1.0)
    assert not restarts_average(window, 30.0 - (AVERAGE_RESTART_MARGIN - 0.01) * sd, 1.0)
    assert not restarts_average(window, 40.0, 1.0)
    assert not restarts_average(window, float("nan"), 1.0)  # a rejected update's loss
    restarted = window.advanced(25.0, 0.5, iterate_average_rate(0), np.where)
    assert (restarted.mean, restarted.variance) == (25.0, 0.25)


def test_one_heavy_tailed_estimate_does_not_restart_the_average_at_the_next():
    """Eight particles, one of them in a funnel's neck ``x`` nats above the rest: the
    estimate rises by ``x/8`` and its standard error is ``x sqrt(7)/(8 sqrt(8))``, 0.94 of
    that rise. Averaged in at rate ``r``, the spike lifts the window's mean by ``r x/8``
    and its error to at least ``r x sqrt(7)/(8 sqrt(8))``: the next ordinary estimate lies
    about one such error below the window's mean, well inside the margin of 4. Without
    the window's variance it would restart the average (the rule first probed did, and
    the non-centered eight schools sat in the band a third of the time)."""
    level, error, spike = 30.0, 1.0, 1350.0
    window = _window([level] * 20, [error] * 20)
    rise, spike_error = spike / 8, spike * math.sqrt(7) / (8 * math.sqrt(8))
    window = window.advanced(level + rise, spike_error, iterate_average_rate(20), np.where)
    assert not restarts_average(window, level, error)
    assert restarts_average(window._replace(variance=0.0), level, error)


@pytest.mark.parametrize("xp", ["numpy", "jax", "torch"])
def test_the_budget_is_larger_while_the_fit_progresses(xp):
    if xp == "jax":
        import jax.numpy as array_module
    elif xp == "torch":
        import torch as array_module
    else:
        array_module = np
    progressing = array_module.asarray(SETTLED_AFTER)
    settled = array_module.asarray(SETTLED_AFTER + 1)
    one, doubled, grown = (array_module.asarray(value) for value in (1.0, 2.0, 4.0))
    assert float(progress_budget_scale(progressing, one)) == PROGRESS_BUDGET_SCALE
    assert float(progress_budget_scale(progressing, doubled)) == PROGRESS_BUDGET_SCALE
    assert float(progress_budget_scale(settled, one)) == 1.0
    assert float(progress_budget_scale(settled, doubled)) == 2.0
    # The larger of the growth and the progress budget, never their product.
    assert float(progress_budget_scale(progressing, grown)) == 4.0
    assert float(progress_budget_scale(settled, grown)) == 4.0


@pytest.mark.parametrize("xp", ["numpy", "jax", "torch"])
def test_a_fit_is_far_from_the_posterior_from_three_doublings_of_its_trust_region(xp):
    """grow_trust_region doubles the budget after each cut step whose estimate fell
    significantly and resets it to 1 after a rise: 8 = three such steps in a row."""
    if xp == "jax":
        import jax.numpy as array_module
    elif xp == "torch":
        import torch as array_module
    else:
        array_module = np
    assert FAR_PHASE_GROWTH == 8.0
    assert not bool(far_from_posterior(array_module.asarray(4.0)))
    assert bool(far_from_posterior(array_module.asarray(8.0)))
    assert bool(far_from_posterior(array_module.asarray(2.0**30)))
