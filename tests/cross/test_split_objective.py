"""The split objectives of diagonal and full-covariance Gaussian guides (issue 19): Pyro
and NumPyro compute the same value and gradient from the same particles and scores
(float32 round-off)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as pdist
import pytest
import torch
from numpyro.infer.autoguide import AutoMultivariateNormal as NumPyroAutoMVN
from numpyro.infer.autoguide import AutoNormal as NumPyroAutoNormal
from pyro.infer.autoguide import AutoMultivariateNormal as PyroAutoMVN
from pyro.infer.autoguide import AutoNormal as PyroAutoNormal

import numpyro_psvi.guides
import numpyro_psvi.objective
import pyro_psvi.guides
import pyro_psvi.objective


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "coordinate-weights"])
@pytest.mark.parametrize("weighting", ["covariance", "identity"])
def test_pyro_and_numpyro_split_objectives_agree(weighting, weighted):
    # The value and the gradient in the location and the scale agree to float32 round-off:
    # NumPyro's by autodiff, Pyro's by autograd and in closed form (what its inner steps use).
    rng = np.random.default_rng(0)
    loc_t, scale_t = rng.normal(size=6), rng.uniform(0.2, 2.0, 6)
    loc, scale = loc_t + 0.3 * rng.normal(size=6), scale_t * rng.uniform(0.5, 2.0, 6)
    particles = (loc_t + scale_t * rng.normal(size=(4, 6))).astype(np.float32)
    scores = rng.normal(size=(4, 6)).astype(np.float32)
    weights = rng.uniform(0.0, 3.0, 6).astype(np.float32) if weighted else None
    options = {"prox_weight": 3.0, "weighting": weighting}

    n_guide = NumPyroAutoNormal(lambda: numpyro.sample("z", ndist.Normal(jnp.zeros(6), 1.0).to_event(1)))
    with numpyro.handlers.seed(rng_seed=0):
        n_guide()
    n_density = numpyro_psvi.guides.guide_density(n_guide)

    def n_params(loc, scale):
        return {"z_auto_loc": jnp.asarray(loc, jnp.float32), "z_auto_scale": jnp.asarray(scale, jnp.float32)}

    n_stats = numpyro_psvi.objective.fisher_statistics(n_density, n_params(loc_t, scale_t), particles, scores)
    n_curvature = numpyro_psvi.objective.curvature_statistics(
        n_stats, n_params(loc_t, scale_t)["z_auto_scale"]
    )

    def n_value(loc, scale):
        return numpyro_psvi.objective.split_diagonal_objective(
            n_density, n_params(loc, scale), n_params(loc_t, scale_t), n_stats, n_curvature,
            weights=None if weights is None else jnp.asarray(weights), **options,
        )[0]  # fmt: skip

    value_n, grads_n = jax.value_and_grad(n_value, argnums=(0, 1))(
        jnp.asarray(loc, jnp.float32), jnp.asarray(scale, jnp.float32)
    )

    pyro.clear_param_store()
    p_guide = PyroAutoNormal(lambda: pyro.sample("z", pdist.Normal(torch.zeros(6), 1.0).to_event(1)))
    p_guide()
    p_density = pyro_psvi.guides.guide_density(p_guide)

    def p_params(loc, scale):
        return {"AutoNormal.locs.z": torch.as_tensor(loc, dtype=torch.float32),
                "AutoNormal.scales.z": torch.as_tensor(scale, dtype=torch.float32)}  # fmt: skip

    params_t = p_params(loc_t, scale_t)
    p_stats = pyro_psvi.objective.fisher_statistics(
        p_density, params_t, torch.as_tensor(particles), torch.as_tensor(scores)
    )
    p_curvature = pyro_psvi.objective.curvature_statistics(p_stats, params_t["AutoNormal.scales.z"])
    params = {name: value.requires_grad_() for name, value in p_params(loc, scale).items()}
    problem = pyro_psvi.objective.split_diagonal_problem(
        p_density, params_t, p_stats, p_curvature,
        weights=None if weights is None else torch.as_tensor(weights), **options,
    )  # fmt: skip
    value_p = problem.objective(params)[0]
    autograd_p = torch.autograd.grad(value_p, list(params.values()))
    closed_form_p = problem.gradient(*(value.detach() for value in params.values()))

    np.testing.assert_allclose(float(value_p), float(value_n), rtol=1e-4)
    for grad_n, grad_p, closed_p in zip(grads_n, autograd_p, closed_form_p, strict=True):
        np.testing.assert_allclose(grad_p.numpy(), np.asarray(grad_n), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(closed_p.numpy(), np.asarray(grad_n), rtol=1e-4, atol=1e-4)

    # The inner steps' scale (folded into the closed form's constants) scales the value
    # and both gradients alike, and leaves the reported terms as they were.
    scaled = pyro_psvi.objective.split_diagonal_problem(
        p_density, params_t, p_stats, p_curvature,
        weights=None if weights is None else torch.as_tensor(weights), **options, objective_scale=0.25,
    )  # fmt: skip
    value_s, terms_s = scaled.objective(params)
    np.testing.assert_allclose(float(value_s), 0.25 * float(value_p), rtol=1e-6)
    assert float(terms_s["fisher"]) == float(problem.objective(params)[1]["fisher"])
    closed_form_s = scaled.gradient(*(value.detach() for value in params.values()))
    for closed_s, closed_p in zip(closed_form_s, closed_form_p, strict=True):
        np.testing.assert_allclose(closed_s.numpy(), 0.25 * closed_p.numpy(), rtol=1e-5, atol=1e-7)


def _full_covariance_problem():
    """A 4-D full-covariance ``q_t``, a nearby ``q``, particles from ``q_t`` and random
    scores, float32."""
    rng = np.random.default_rng(1)
    dim = 4
    tril_t = np.tril(0.3 * rng.normal(size=(dim, dim)), -1) + np.diag(rng.uniform(0.5, 1.5, dim))
    tril = tril_t + np.tril(0.1 * rng.normal(size=(dim, dim)))
    loc_t = rng.normal(size=dim)
    loc = loc_t + 0.3 * rng.normal(size=dim)
    particles = loc_t + rng.normal(size=(5, dim)) @ tril_t.T
    scores = rng.normal(size=(5, dim))
    return [a.astype(np.float32) for a in (loc, tril, loc_t, tril_t, particles, scores)]


@pytest.mark.parametrize("weighting", ["covariance", "identity"])
def test_pyro_and_numpyro_full_covariance_split_objectives_agree(weighting):
    loc, tril, loc_t, tril_t, particles, scores = _full_covariance_problem()
    dim = loc.size

    n_guide = NumPyroAutoMVN(lambda: numpyro.sample("z", ndist.Normal(jnp.zeros(dim), 1.0).to_event(1)))
    with numpyro.handlers.seed(rng_seed=0):
        n_guide()
    n_density = numpyro_psvi.guides.guide_density(n_guide)

    def n_value(loc, tril):
        return numpyro_psvi.objective.split_full_objective(
            n_density, {"auto_loc": loc, "auto_scale_tril": tril},
            {"auto_loc": jnp.asarray(loc_t), "auto_scale_tril": jnp.asarray(tril_t)},
            jnp.asarray(particles), jnp.asarray(scores), prox_weight=3.0, weighting=weighting,
        )[0]  # fmt: skip

    value_n, grads_n = jax.value_and_grad(n_value, (0, 1))(jnp.asarray(loc), jnp.asarray(tril))

    pyro.clear_param_store()
    p_guide = PyroAutoMVN(lambda: pyro.sample("z", pdist.Normal(torch.zeros(dim), 1.0).to_event(1)))
    p_guide()
    p_density = pyro_psvi.guides.guide_density(p_guide)

    def p_params(loc, tril):  # Pyro's layout: L = diag(scale) @ unit lower triangular
        scale = torch.diagonal(tril)
        return dict(zip(p_density.param_names, (loc, scale, tril / scale[:, None]), strict=True))

    p_loc, p_tril = (torch.as_tensor(a).requires_grad_() for a in (loc, tril))
    value_p = pyro_psvi.objective.split_full_objective(
        p_density, p_params(p_loc, p_tril), p_params(torch.as_tensor(loc_t), torch.as_tensor(tril_t)),
        torch.as_tensor(particles), torch.as_tensor(scores), prox_weight=3.0, weighting=weighting,
    )[0]  # fmt: skip
    grads_p = torch.autograd.grad(value_p, (p_loc, p_tril))

    np.testing.assert_allclose(float(value_p.detach()), float(value_n), rtol=1e-4)
    for grad_p, grad_n in zip(grads_p, grads_n, strict=True):
        np.testing.assert_allclose(np.tril(grad_p.numpy()), np.tril(np.asarray(grad_n)), rtol=1e-3, atol=1e-3)
