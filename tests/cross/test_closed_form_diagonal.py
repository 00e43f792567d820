"""The closed-form proximal step of a diagonal Gaussian guide (issue 20): the fixed point
of the split objective the optimizer path descends, the two backends' twins, the trust
region, and fits far from unit scale in both engines."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pyro
import pytest
import torch
from numpyro.infer.autoguide import AutoDiagonalNormal as NumPyroAutoDiagonal
from numpyro.infer.autoguide import AutoNormal as NumPyroAutoNormal
from numpyro.infer.initialization import init_to_median
from numpyro.infer.initialization import init_to_value as numpyro_init_to_value
from pyro.infer.autoguide import AutoDiagonalNormal as PyroAutoDiagonal
from pyro.infer.autoguide import init_to_value as pyro_init_to_value

import numpyro_psvi
import numpyro_psvi.contrib.models
import pyro_psvi
import pyro_psvi.contrib.models
import pyro_psvi.objective as pyro_objective
from numpyro_psvi.objective import (
    CurvatureStatistics,
    FisherStatistics,
    diagonal_proximal_step,
    split_diagonal_objective,
)
from psvi.contrib.targets import earnings_data, earnings_diagonal_optimum
from psvi.objective import discounted_updates

numpyro_step = jax.jit(diagonal_proximal_step, static_argnums=(4, 5))


def _problem(dim: int = 6, num: int = 5, seed: int = 0):
    """A guide ``N(loc_t, scale_t^2)``, ``num`` of its particles with the exact scores of a
    correlated Gaussian target, their statistics and (noisy) curvature, in float64."""
    rng = np.random.default_rng(seed)
    loc_t, scale_t = rng.normal(size=dim), np.exp(rng.normal(size=dim))
    b = rng.normal(size=(dim, dim))
    precision = b @ b.T / dim + 0.3 * np.eye(dim)
    mean = loc_t + 2.0 * rng.normal(size=dim)
    particles = loc_t + scale_t * rng.normal(size=(num, dim))
    scores = -(particles - mean) @ precision
    v = particles - loc_t
    stats = [num, v.sum(0), (v**2).sum(0), (v * scores).sum(0), scores.sum(0), (scores**2).sum(0)]
    centred_v = v - v.mean(0)
    curvature = [(centred_v**2).sum(0) / scale_t**2, -(centred_v * scores).sum(0) / scale_t**2]
    weights = rng.uniform(0.5, 2.0, size=dim)
    return loc_t, scale_t, stats, curvature, weights


def _numpyro_args(loc_t, scale_t, stats, curvature):
    as_jax = [stats[0], *(jnp.asarray(s) for s in stats[1:])]
    return (
        jnp.asarray(loc_t), jnp.asarray(scale_t),
        FisherStatistics(*as_jax), CurvatureStatistics(*(jnp.asarray(c) for c in curvature)),
    )  # fmt: skip


def _pyro_args(loc_t, scale_t, stats, curvature):
    as_torch = [stats[0], *(torch.tensor(s) for s in stats[1:])]
    return (
        torch.tensor(loc_t), torch.tensor(scale_t),
        pyro_objective.FisherStatistics(*as_torch),
        pyro_objective.CurvatureStatistics(*(torch.tensor(c) for c in curvature)),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _float64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


DENSITY = SimpleNamespace(loc_scale=lambda params: (params["loc"], params["scale"]))


@pytest.mark.parametrize("weighting", ["covariance", "identity"])
def test_the_unbounded_step_is_the_stationary_point_of_the_split_objective(weighting):
    # The split objective holds the precision in its location terms at the current
    # iterate; at the step's (loc, scale) both gradients vanish. Their terms are of size
    # ~prox_weight = 10, so float64 round-off leaves ~1e-14; an error in the algebra
    # leaves O(1), far above the 1e-8 asserted.
    loc_t, scale_t, stats, curvature, weights = _problem()
    args = _numpyro_args(loc_t, scale_t, stats, curvature)
    step = numpyro_step(*args, 10.0, weighting, jnp.inf, jnp.asarray(weights))
    assert float(step.frac) == 1.0

    def objective(loc, scale):
        params, params_t = {"loc": loc, "scale": scale}, {"loc": args[0], "scale": args[1]}
        options = {"prox_weight": 10.0, "weighting": weighting, "weights": jnp.asarray(weights)}
        return split_diagonal_objective(DENSITY, params, params_t, args[2], args[3], **options)[0]

    grads = jax.grad(objective, argnums=(0, 1))(step.loc, step.scale)
    np.testing.assert_allclose(np.concatenate([np.asarray(g) for g in grads]), 0.0, atol=1e-8)

    pyro_problem = pyro_objective.split_diagonal_problem(
        DENSITY, {"loc": torch.tensor(loc_t), "scale": torch.tensor(scale_t)}, *_pyro_args(
            loc_t, scale_t, stats, curvature)[2:], prox_weight=10.0, weighting=weighting,
        weights=torch.tensor(weights),
    )  # fmt: skip
    pyro_grads = pyro_problem.gradient(
        torch.tensor(np.asarray(step.loc)), torch.tensor(np.asarray(step.scale))
    )
    np.testing.assert_allclose(torch.cat(pyro_grads).numpy(), 0.0, atol=1e-8)


def test_the_step_is_the_largest_fraction_within_the_kl_budget_in_both_backends():
    # The KL along the path is 0 at f = 0 and continuous, so the bisection (40 halvings of
    # log f) leaves it within the budget and above 99% of it; the twins agree to round-off.
    loc_t, scale_t, stats, curvature, _ = _problem(seed=1)
    args = _numpyro_args(loc_t, scale_t, stats, curvature)
    budget = 0.02 * loc_t.size

    def kl(step):
        ratio = (scale_t / np.asarray(step.scale)) ** 2
        delta = np.asarray(step.loc) - loc_t
        return 0.5 * np.sum(ratio - 1 - np.log(ratio) + delta**2 / np.asarray(step.scale) ** 2)

    assert kl(numpyro_step(*args, 10.0, "covariance", jnp.inf)) > budget  # it binds
    step = numpyro_step(*args, 10.0, "covariance", budget)
    assert 0 < float(step.frac) < 1
    assert 0.99 * budget <= kl(step) <= budget * (1 + 1e-9)
    twin = pyro_objective.diagonal_proximal_step(
        *_pyro_args(loc_t, scale_t, stats, curvature), 10.0, "covariance", budget
    )
    np.testing.assert_allclose(float(twin.frac), float(step.frac), rtol=1e-9)
    np.testing.assert_allclose(twin.loc.numpy(), np.asarray(step.loc), atol=1e-9)
    np.testing.assert_allclose(twin.scale.numpy(), np.asarray(step.scale), atol=1e-9)


# A separable Gaussian target far from unit scale: means 3e3, sds 1e-2 .. 50.
FAR_MEAN = np.array([3e3, -3e3, 3e3])
FAR_SD = np.array([1e-2, 1.0, 50.0])


@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_a_diagonal_guide_far_from_unit_scale_reaches_a_separable_target(backend):
    # On a separable Gaussian target each coordinate's scores are exactly linear in it,
    # so the curvature statistics are exact and the step's location is exact up to the
    # proximal damping (1/6 of the gap per update at prox_weight 10 once the precision is
    # right): no Monte Carlo noise, the fit converges geometrically. The start is 3e5
    # target sds away (init loc 0, scale 0.1), where Adam's 0.01-sized steps would need
    # ~3e5 updates for the means; the trust region grows while the steps pay off. 400
    # updates leave room for the growth's doublings (~30) and the precision's ~1e3 ratio;
    # the bounds are the project's (0.2 sd, 20%); float32's spacing at 3e3 is 0.024 of the 1e-2 sd.
    cov = np.diag(FAR_SD**2)
    zeros = np.zeros(3)
    if backend == "numpyro":
        jax.config.update("jax_enable_x64", False)
        model = numpyro_psvi.contrib.models.gaussian_target(FAR_MEAN, cov)
        guide = NumPyroAutoNormal(model, init_loc_fn=numpyro_init_to_value(values={"x": jnp.asarray(zeros)}))
        svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2), inner_solver="closed_form")
        result = svi.run(jax.random.PRNGKey(0), 400, progress_bar=False)
        loc, sd = (np.asarray(result.params[f"x_auto_{side}"], np.float64) for side in ("loc", "scale"))
    else:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = pyro_psvi.contrib.models.gaussian_target(FAR_MEAN, cov)
        guide = PyroAutoDiagonal(model, init_loc_fn=pyro_init_to_value(values={"x": torch.zeros(3)}))
        svi = pyro_psvi.ProximalScoreVI(
            model, guide, pyro.optim.Adam({"lr": 1e-2}), inner_solver="closed_form"
        )
        for _ in range(400):
            svi.step()
        loc, sd = (value.detach().double().numpy() for value in (guide.loc, guide.scale))
    assert svi.inner_solver == "closed_form"
    np.testing.assert_array_less(np.abs(loc - FAR_MEAN) / FAR_SD, 0.2)
    np.testing.assert_array_less(np.abs(sd / FAR_SD - 1), 0.2)


def test_the_curvature_average_is_discounted_by_the_kl_a_step_travels_in_both_backends():
    # exp(-KL) per coordinate: a coordinate that did not move keeps its count; one that
    # moved 40 of its sds (KL 800) forgets it; in both backends' arrays.
    updates, loc_t, scale_t = np.array([50.0, 50.0, 50.0]), np.zeros(3), np.ones(3)
    loc, scale = np.array([0.0, 0.5, 40.0]), np.array([1.0, 1.0, 1.0])
    expected = updates * np.exp(-0.5 * loc**2)
    values = (updates, loc_t, scale_t, loc, scale)
    np.testing.assert_allclose(np.asarray(discounted_updates(jnp, *map(jnp.asarray, values))), expected)
    np.testing.assert_allclose(discounted_updates(torch, *map(torch.tensor, values)).numpy(), expected)


@pytest.mark.slow  # ~10 s; the default run has the discount's unit test above
def test_from_init_to_median_the_sds_leave_the_starts_curvature_behind():
    # Earnings in dollars from init_to_median: the start's residuals are ~1e5x the
    # posterior's, the fitted precision of log sigma ~1e10x its optimum's. Averaged over
    # 100 updates that curvature lingered and the sds ended 2e-6..2e-5 of the diagonal
    # optimum's after 2,000 updates; discounted by the KL each step travels they are
    # within 20% from update 1,190 (benchmarks.diagonal_study). The means stay far: the
    # coefficients correlate -0.999, and a diagonal guide moves them by the damped
    # Jacobi steps of coordinate-wise fits (docs/gaussian_study.md, "Diagonal guides").
    jax.config.update("jax_enable_x64", False)
    height, earn = earnings_data()
    _, optimum_sd = earnings_diagonal_optimum(height, earn)
    model = numpyro_psvi.contrib.models.earnings_regression
    guide = NumPyroAutoDiagonal(model, init_loc_fn=init_to_median)
    svi = numpyro_psvi.ProximalScoreVI(
        model, guide, numpyro.optim.Adam(1e-2), num_particles=8, inner_solver="closed_form"
    )
    result = svi.run(jax.random.PRNGKey(0), 1500, jnp.asarray(height), jnp.asarray(earn), progress_bar=False)
    np.testing.assert_array_less(np.abs(np.asarray(result.params["auto_scale"]) / optimum_sd - 1), 0.2)
