"""Site-wise closed forms of mean-field user-written guides, both backends.

A mean-field guide's density is the product of its sites', so ``KL(q0 || q1)`` is the sum
of the sites' KLs and its covariance is diagonal: the engines use the PPL's
``kl_divergence`` rules and the sites' variances instead of Monte Carlo draws
(``site_closed_forms``). These tests check the detection on the guide's computation
graph, the closed-form KL against the Monte Carlo one it replaces (an independent code
path) and against the other backend, and the covariance weighting against ``scale**2``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as pdist
import pytest
import torch
from numpyro.distributions import constraints as nconstraints
from numpyro.distributions.transforms import AffineTransform, SigmoidTransform
from numpyro.distributions.transforms import biject_to as nbiject_to
from torch.distributions import constraints as pconstraints

from numpyro_psvi.guides import guide_density as n_guide_density
from numpyro_psvi.guides import site_closed_forms as n_site_closed_forms
from psvi.families import NO_CLOSED_FORMS, SiteClosedForms
from pyro_psvi.guides import _autodiff_score, user_guide_density, user_guide_layout
from pyro_psvi.guides import site_closed_forms as p_site_closed_forms

LOC0, SCALE0, SHAPE0, RATE0 = [0.3, -1.0, 2.0], [0.5, 1.2, 0.8], 3.0, 2.0
LOC1, SCALE1, SHAPE1, RATE1 = [0.1, -0.4, 2.5], [0.7, 1.0, 0.6], 2.0, 1.5


def p_model():
    pyro.sample("a", pdist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("s", pdist.HalfNormal(1.0))


def p_guide(structured=False):
    loc = pyro.param("loc", torch.tensor(LOC0))
    scale = pyro.param("scale", torch.tensor(SCALE0), constraint=pconstraints.positive)
    shape = pyro.param("shape", torch.tensor(SHAPE0), constraint=pconstraints.positive)
    rate = pyro.param("rate", torch.tensor(RATE0), constraint=pconstraints.positive)
    a = pyro.sample("a", pdist.Normal(loc, scale).to_event(1))
    pyro.sample("s", pdist.Gamma(shape * (a[..., 0].exp() if structured else 1.0), rate))


def p_normal_model():
    pyro.sample("a", pdist.Normal(torch.zeros(3), 1.0).to_event(1))


def p_normal_guide():
    loc = pyro.param("loc", torch.tensor(LOC0))
    scale = pyro.param("scale", torch.tensor(SCALE0), constraint=pconstraints.positive)
    pyro.sample("a", pdist.Normal(loc, scale).to_event(1))


def n_model():
    numpyro.sample("a", ndist.Normal(jnp.zeros(3), 1.0).to_event(1))
    numpyro.sample("s", ndist.HalfNormal(1.0))


def n_guide(structured=False):
    loc = numpyro.param("loc", jnp.array(LOC0))
    scale = numpyro.param("scale", jnp.array(SCALE0), constraint=nconstraints.positive)
    shape = numpyro.param("shape", SHAPE0, constraint=nconstraints.positive)
    rate = numpyro.param("rate", RATE0, constraint=nconstraints.positive)
    a = numpyro.sample("a", ndist.Normal(loc, scale).to_event(1))
    numpyro.sample("s", ndist.Gamma(shape * (jnp.exp(a[..., 0]) if structured else 1.0), rate))


def n_normal_model():
    numpyro.sample("a", ndist.Normal(jnp.zeros(3), 1.0).to_event(1))


def n_normal_guide():
    loc = numpyro.param("loc", jnp.array(LOC0))
    scale = numpyro.param("scale", jnp.array(SCALE0), constraint=nconstraints.positive)
    numpyro.sample("a", ndist.Normal(loc, scale).to_event(1))


def p_density(guide, model, closed_forms, num_kl_draws=256, **kwargs):
    pyro.clear_param_store()
    model_trace = pyro.poutine.trace(model).get_trace()
    guide_trace = pyro.poutine.trace(guide).get_trace(**kwargs)
    layout = user_guide_layout(guide, model_trace, guide_trace)
    found = p_site_closed_forms(guide, guide_trace, (), kwargs, layout.supports)
    density = user_guide_density(
        guide, layout, (), kwargs, max_plate_nesting=0, num_kl_draws=num_kl_draws,
        closed_forms=found if closed_forms else NO_CLOSED_FORMS,
    )  # fmt: skip
    return density, found


P_PARAMS0 = {"loc": LOC0, "scale": SCALE0, "shape": SHAPE0, "rate": RATE0}
P_PARAMS1 = {"loc": LOC1, "scale": SCALE1, "shape": SHAPE1, "rate": RATE1}


def tensors(params):
    return {name: torch.tensor(value) for name, value in params.items()}


P_SUPPORTS = {"a": pconstraints.real, "s": pconstraints.positive}
N_TRANSFORMS = {"a": nbiject_to(nconstraints.real), "s": nbiject_to(nconstraints.positive)}


def test_site_closed_forms_are_found_on_the_guides_graph_only_for_mean_field_guides():
    pyro.clear_param_store()
    found = p_site_closed_forms(p_guide, pyro.poutine.trace(p_guide).get_trace(), (), {}, P_SUPPORTS)
    assert found == SiteClosedForms(True, True, True, linear=True)
    structured = pyro.poutine.trace(p_guide).get_trace(structured=True)
    assert p_site_closed_forms(p_guide, structured, (), {"structured": True}, P_SUPPORTS) == NO_CLOSED_FORMS
    assert n_site_closed_forms(n_guide, (), {}, N_TRANSFORMS) == SiteClosedForms(
        True, True, True, linear=True
    )
    assert n_site_closed_forms(n_guide, (), {"structured": True}, N_TRANSFORMS) == NO_CLOSED_FORMS

    def n_reads_a_later_site():  # dependence against the sites' alphabetical order
        z = numpyro.sample("z", ndist.Normal(0.0, 1.0))
        numpyro.sample("b", ndist.Normal(z, 1.0))

    reals = {"z": N_TRANSFORMS["a"], "b": N_TRANSFORMS["a"]}
    assert n_site_closed_forms(n_reads_a_later_site, (), {}, reals) == NO_CLOSED_FORMS
    # A Gamma on a site whose support is the unit interval has no closed-form variance
    # there (its values under the model's logit): the weighting is drawn.
    unit = {"a": N_TRANSFORMS["a"], "s": nbiject_to(nconstraints.unit_interval)}
    assert n_site_closed_forms(n_guide, (), {}, unit) == SiteClosedForms(True, True, False)
    p_unit = {"a": pconstraints.real, "s": pconstraints.unit_interval}
    assert p_site_closed_forms(p_guide, pyro.poutine.trace(p_guide).get_trace(), (), {}, p_unit) == (
        SiteClosedForms(True, True, False)
    )


def test_site_kl_is_the_monte_carlo_kl_it_replaces_and_agrees_across_backends():
    closed, found = p_density(p_guide, p_model, closed_forms=True)
    assert found == SiteClosedForms(True, True, True, linear=True)
    p_closed = float(closed.kl(tensors(P_PARAMS0), tensors(P_PARAMS1)))
    # The Monte Carlo KL with 40,000 draws: its error is the sd of the log ratio over the
    # draws / sqrt(40,000) (the control variate has mean zero); 4 standard errors.
    draws = 40_000
    monte_carlo, _ = p_density(p_guide, p_model, closed_forms=False, num_kl_draws=draws)
    torch.manual_seed(0)
    p_mc = float(monte_carlo.kl(tensors(P_PARAMS0), tensors(P_PARAMS1), seed=0))
    u = monte_carlo.sample(tensors(P_PARAMS0), draws)
    log_ratio = monte_carlo.log_prob(tensors(P_PARAMS0), u) - monte_carlo.log_prob(tensors(P_PARAMS1), u)
    assert abs(p_closed - p_mc) < 4 * float(log_ratio.std()) / draws**0.5
    assert float(closed.kl(tensors(P_PARAMS0), tensors(P_PARAMS0))) == 0.0

    n_density = n_guide_density(n_guide, model=n_model)
    n_params0 = {name: jnp.asarray(value) for name, value in P_PARAMS0.items()}
    n_params1 = {name: jnp.asarray(value) for name, value in P_PARAMS1.items()}
    n_closed = float(n_density.kl(n_params0, n_params1, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(n_closed, p_closed, rtol=1e-5)  # float32 sums of the same terms


def test_site_covariance_weighting_is_the_sites_variance_on_unconstrained_sites():
    r = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 1.5]])
    expected = (torch.tensor(SCALE0) ** 2 * r**2).sum(-1)
    density, found = p_density(p_normal_guide, p_normal_model, closed_forms=True)
    params = {"loc": torch.tensor(LOC0), "scale": torch.tensor(SCALE0)}
    torch.testing.assert_close(density.cov_quad(params, r), expected)
    n_density = n_guide_density(n_normal_guide, model=n_normal_model)
    n_params = {"loc": jnp.asarray(LOC0), "scale": jnp.asarray(SCALE0)}
    n_quad = jax.vmap(n_density.cov_quad, (None, 0))(n_params, jnp.asarray(r.numpy()))
    np.testing.assert_allclose(n_quad, expected.numpy(), rtol=1e-6)
    # A Gamma site on the positive reals: the variance of log s is trigamma(shape)
    # (unconstrained_variance); the Monte Carlo weighting of 40,000 draws it replaces
    # agrees within 4 standard errors of a sample variance (sqrt((m4 - var^2) / n)).
    closed, _ = p_density(p_guide, p_model, closed_forms=True)
    draws = 40_000
    monte_carlo, _ = p_density(p_guide, p_model, closed_forms=False, num_kl_draws=draws)
    params = tensors(P_PARAMS0)
    r4 = torch.tensor([0.0, 0.0, 0.0, 1.0])
    exact = float(torch.polygamma(1, torch.tensor(SHAPE0)))
    np.testing.assert_allclose(float(closed.cov_quad(params, r4)), exact, rtol=1e-6)
    log_s = monte_carlo.sample(params, draws)[:, 3].double()
    centred = log_s - log_s.mean()
    standard_error = float(((centred**4).mean() - (centred**2).mean() ** 2) / draws) ** 0.5
    assert abs(float(monte_carlo.cov_quad(params, r4)) - exact) < 4 * standard_error
    n_density = n_guide_density(n_guide, model=n_model)
    n_params = {name: jnp.asarray(value) for name, value in P_PARAMS0.items()}
    n_quad = n_density.cov_quad(n_params, jnp.asarray(r4.numpy()))
    np.testing.assert_allclose(float(n_quad), exact, rtol=1e-5)


def test_lognormal_sites_take_their_normals_kl_in_both_backends_and_other_transforms_do_not():
    def p_lognormal_guide():
        pyro.sample("s", pdist.LogNormal(pyro.param("m", torch.tensor(0.2)), 0.5))

    def n_lognormal_guide():
        numpyro.sample("s", ndist.LogNormal(numpyro.param("m", 0.2), 0.5))

    def p_shifted_guide():  # a transform the params move: torch's rule would fail mid-fit
        shift = pyro.param("shift", torch.tensor(0.0))
        base = pdist.Normal(0.0, 1.0)
        shifted = torch.distributions.AffineTransform(shift, 1.0)
        pyro.sample("s", pdist.TransformedDistribution(base, [shifted]))

    def p_half_model():
        pyro.sample("s", pdist.HalfNormal(1.0))

    def n_half_model():
        numpyro.sample("s", ndist.HalfNormal(1.0))

    density, found = p_density(p_lognormal_guide, p_half_model, closed_forms=True)
    assert found == SiteClosedForms(True, True, True, True, linear=True)
    pyro.clear_param_store()
    shifted = pyro.poutine.trace(p_shifted_guide).get_trace()
    assert p_site_closed_forms(p_shifted_guide, shifted, (), {}, {"s": pconstraints.real}).kl is False
    # KL(LogNormal(0.2, 0.5) || LogNormal(0.7, 0.5)) = KL of the Normals = 0.5^2 / (2 * 0.5^2) = 0.5.
    p_kl = float(density.kl({"m": torch.tensor(0.2)}, {"m": torch.tensor(0.7)}))
    assert abs(p_kl - 0.5) < 1e-6
    n_density = n_guide_density(n_lognormal_guide, model=n_half_model)
    n_kl = float(n_density.kl({"m": jnp.asarray(0.2)}, {"m": jnp.asarray(0.7)}, jax.random.PRNGKey(0)))
    n_found = n_site_closed_forms(n_lognormal_guide, (), {}, {"s": nbiject_to(nconstraints.positive)})
    assert n_found.kl and abs(n_kl - 0.5) < 1e-6


def p_members_model():
    pyro.sample("s", pdist.HalfNormal(1.0))
    with pyro.plate("members", 6, subsample_size=3):
        pyro.sample("z", pdist.Normal(0.0, 1.0))


def p_members_guide():
    shape = pyro.param("shape", torch.tensor(SHAPE0), constraint=pconstraints.positive)
    rate = pyro.param("rate", torch.tensor(RATE0), constraint=pconstraints.positive)
    loc = pyro.param("loc", torch.linspace(-1.0, 1.0, 6))
    scale = pyro.param("scale", torch.linspace(0.5, 1.5, 6), constraint=pconstraints.positive)
    pyro.sample("s", pdist.Gamma(shape, rate))
    with pyro.plate("members", 6, subsample_size=3) as members:
        pyro.sample("z", pdist.Normal(loc[members], scale[members]))


def test_mean_field_score_from_one_guide_run_is_the_score_of_the_guides_density():
    """A mean-field guide's score at the particles comes from one run of the guide (its
    sites' distributions broadcast against the draws), where the generic score runs the
    guide at the draws themselves: the same function, so value and second-order
    gradient in the params agree to float32 round-off, for a constrained site and a
    local latent in a subsampled plate (the batch's members, shared with the draws)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model_trace = pyro.poutine.trace(p_members_model).get_trace()
    guide_trace = pyro.poutine.trace(p_members_guide).get_trace()
    layout = user_guide_layout(p_members_guide, model_trace, guide_trace)
    found = p_site_closed_forms(p_members_guide, guide_trace, (), {}, layout.supports)
    assert found == SiteClosedForms(True, True, True)
    density = user_guide_density(p_members_guide, layout, (), {}, max_plate_nesting=1, closed_forms=found)
    params = {
        "shape": torch.tensor(SHAPE0), "rate": torch.tensor(RATE0),
        "loc": torch.linspace(-1.0, 1.0, 6), "scale": torch.linspace(0.5, 1.5, 6),
    }  # fmt: skip
    u = density.sample(params, 5)  # draws the step's members
    weights = torch.randn(u.shape)
    results = []
    for score in (density.score, _autodiff_score(density.log_prob)):
        leaves = {name: value.clone().requires_grad_() for name, value in params.items()}
        value = score(leaves, u)
        grads = torch.autograd.grad((value * weights).sum(), list(leaves.values()))
        results.append((value, grads))
    (mean_field, mean_field_grads), (generic, generic_grads) = results
    assert bool((mean_field[:, 1:] != 0).sum(-1).eq(3).all())  # the 3 members' coordinates
    torch.testing.assert_close(mean_field, generic)
    for found_grad, expected_grad in zip(mean_field_grads, generic_grads, strict=True):
        torch.testing.assert_close(found_grad, expected_grad)
    # The KL after a score at the same params reuses its run: the value of a fresh run.
    shifted = {name: value + 0.1 for name, value in params.items()}
    density.score(shifted, u)
    reused = density.kl(params, shifted)
    torch.testing.assert_close(reused, density.kl(params, shifted))


SIGMA_LOC0, SIGMA_LOC1, SIGMA_SCALE = 0.3, -0.2, 0.05


def p_sigma_model():
    pyro.sample("sigma", pdist.Uniform(0.0, 10.0))


def p_sigma_guide():  # Bayesian regression II's: a logit-Normal on (0, 10)
    loc = pyro.param("sigma_loc", torch.tensor(SIGMA_LOC0))
    on_support = [torch.distributions.SigmoidTransform(), torch.distributions.AffineTransform(0.0, 10.0)]
    pyro.sample("sigma", pdist.TransformedDistribution(pdist.Normal(loc, SIGMA_SCALE), on_support))


def n_sigma_model():
    numpyro.sample("sigma", ndist.Uniform(0.0, 10.0))


def n_sigma_guide(moving=False):
    loc = numpyro.param("sigma_loc", SIGMA_LOC0)
    upper = 10.0 * jnp.exp(loc) if moving else 10.0  # a transform the params move
    on_support = [SigmoidTransform(), AffineTransform(0.0, upper)]
    numpyro.sample("sigma", ndist.TransformedDistribution(ndist.Normal(loc, SIGMA_SCALE), on_support))


def test_transformed_sites_with_constant_transforms_take_their_bases_kl_and_variance():
    """A ``TransformedDistribution`` with constant transforms: the KL of two is their bases'
    (a common bijection leaves the KL); when the transforms are the model site's
    bijection, the value's unconstrained preimage is a base draw, whose variance is the
    base's. Checked against the exact Normal KL and the 40,000-draw sample variance
    of the preimages under the model's bijection (4 standard errors); under another
    bijection, (0, 5)'s, the variance is drawn; a transform the params move keeps the
    Monte Carlo KL."""
    exact_kl = (SIGMA_LOC0 - SIGMA_LOC1) ** 2 / (2 * SIGMA_SCALE**2)
    density, found = p_density(p_sigma_guide, p_sigma_model, closed_forms=True)
    assert found == SiteClosedForms(True, True, True, True, linear=True)
    p_params0, p_params1 = {"sigma_loc": torch.tensor(SIGMA_LOC0)}, {"sigma_loc": torch.tensor(SIGMA_LOC1)}
    np.testing.assert_allclose(float(density.kl(p_params0, p_params1)), exact_kl, rtol=1e-5)
    weight = float(density.cov_quad(p_params0, torch.ones(1, 1)))
    np.testing.assert_allclose(weight, SIGMA_SCALE**2, rtol=1e-5)
    draws = 40_000
    u = density.sample(p_params0, draws)[:, 0].double()  # the model's bijection's preimages
    centred = u - u.mean()
    standard_error = float(((centred**4).mean() - (centred**2).mean() ** 2) / draws) ** 0.5
    assert abs(float(centred.pow(2).mean()) - weight) < 4 * standard_error
    pyro.clear_param_store()
    sigma_trace = pyro.poutine.trace(p_sigma_guide).get_trace()
    p_narrower = {"sigma": pconstraints.interval(0.0, 5.0)}
    assert p_site_closed_forms(p_sigma_guide, sigma_trace, (), {}, p_narrower) == SiteClosedForms(
        True, True, False
    )

    n_density = n_guide_density(n_sigma_guide, model=n_sigma_model)
    n_kl = n_density.kl({"sigma_loc": jnp.asarray(SIGMA_LOC0)}, {"sigma_loc": jnp.asarray(SIGMA_LOC1)}, None)
    np.testing.assert_allclose(float(n_kl), exact_kl, rtol=1e-5)
    n_weight = n_density.cov_quad({"sigma_loc": jnp.asarray(SIGMA_LOC0)}, jnp.ones(1))
    np.testing.assert_allclose(float(n_weight), SIGMA_SCALE**2, rtol=1e-5)
    interval = {"sigma": nbiject_to(nconstraints.interval(0.0, 10.0))}
    assert n_site_closed_forms(n_sigma_guide, (), {}, interval) == SiteClosedForms(
        True, True, True, True, linear=True
    )
    narrower = {"sigma": nbiject_to(nconstraints.interval(0.0, 5.0))}
    assert n_site_closed_forms(n_sigma_guide, (), {}, narrower) == SiteClosedForms(True, True, False)
    moving = n_site_closed_forms(n_sigma_guide, (), {"moving": True}, interval)
    assert moving == SiteClosedForms(True, False, False)


SCHOOLS_Y = [2.0, -1.0, 0.5, 3.0]


def p_schools_model(y):
    mu = pyro.sample("mu", pdist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", pdist.HalfNormal(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", pdist.Normal(mu, tau))
        pyro.sample("obs", pdist.Normal(theta, 1.0), obs=y)


def p_schools_guide(y):  # AutoNormal written by hand: Normal, LogNormal, a plate of Normals
    def loc_scale(name, shape=()):
        loc = pyro.param(f"{name}_loc", torch.zeros(shape))
        softplus = pdist.constraints.softplus_positive
        scale = pyro.param(f"{name}_scale", torch.full(shape, 0.1), constraint=softplus)
        return loc, scale

    pyro.sample("mu", pdist.Normal(*loc_scale("mu")))
    pyro.sample("tau", pdist.LogNormal(*loc_scale("tau")))
    with pyro.plate("schools", len(y)):
        pyro.sample("theta", pdist.Normal(*loc_scale("theta", (len(y),))))


def n_schools_model(y):
    mu = numpyro.sample("mu", ndist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", ndist.HalfNormal(5.0))
    with numpyro.plate("schools", len(y)):
        theta = numpyro.sample("theta", ndist.Normal(mu, tau))
        numpyro.sample("obs", ndist.Normal(theta, 1.0), obs=y)


def n_schools_guide(y):
    def loc_scale(name, shape=()):
        loc = numpyro.param(f"{name}_loc", jnp.zeros(shape))
        scale = numpyro.param(
            f"{name}_scale", jnp.full(shape, 0.1), constraint=nconstraints.softplus_positive
        )
        return loc, scale

    numpyro.sample("mu", ndist.Normal(*loc_scale("mu")))
    numpyro.sample("tau", ndist.LogNormal(*loc_scale("tau")))
    with numpyro.plate("schools", len(y)):
        numpyro.sample("theta", ndist.Normal(*loc_scale("theta", (len(y),))))


REG_X = np.linspace(-1.0, 1.0, 40).astype(np.float32)
REG_Y = (0.5 + 1.5 * REG_X + 0.3 * np.sin(7.0 * REG_X)).astype(np.float32)


def p_regression_model(x, y):  # a subsampled plate: the mini-batch regime
    w = pyro.sample("w", pdist.Normal(torch.zeros(2), 1.0).to_event(1))
    sigma = pyro.sample("sigma", pdist.HalfNormal(1.0))
    with pyro.plate("data", len(x), subsample_size=10) as batch:
        pyro.sample("obs", pdist.Normal(w[..., :1] + w[..., 1:] * x[batch], sigma), obs=y[batch])


def p_regression_guide(x, y):
    softplus = pdist.constraints.softplus_positive
    w_loc = pyro.param("w_loc", torch.zeros(2))
    w_scale = pyro.param("w_scale", torch.full((2,), 0.1), constraint=softplus)
    pyro.sample("w", pdist.Normal(w_loc, w_scale).to_event(1))
    sigma_loc = pyro.param("sigma_loc", torch.tensor(0.0))
    sigma_scale = pyro.param("sigma_scale", torch.tensor(0.1), constraint=softplus)
    pyro.sample("sigma", pdist.LogNormal(sigma_loc, sigma_scale))


def n_regression_model(x, y):
    w = numpyro.sample("w", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))
    sigma = numpyro.sample("sigma", ndist.HalfNormal(1.0))
    with numpyro.plate("data", len(x), subsample_size=10) as batch:
        numpyro.sample("obs", ndist.Normal(w[..., :1] + w[..., 1:] * x[batch], sigma), obs=y[batch])


def n_regression_guide(x, y):
    softplus = nconstraints.softplus_positive
    w_loc = numpyro.param("w_loc", jnp.zeros(2))
    w_scale = numpyro.param("w_scale", jnp.full(2, 0.1), constraint=softplus)
    numpyro.sample("w", ndist.Normal(w_loc, w_scale).to_event(1))
    sigma_loc = numpyro.param("sigma_loc", 0.0)
    sigma_scale = numpyro.param("sigma_scale", 0.1, constraint=softplus)
    numpyro.sample("sigma", ndist.LogNormal(sigma_loc, sigma_scale))


NORMAL_USER_GUIDES = {
    # name: Pyro model, guide, NumPyro model, guide, data, site names, regime (K, averaged)
    "eight schools, exact scores": (
        p_schools_model, p_schools_guide, n_schools_model, n_schools_guide, (SCHOOLS_Y,),
        ("mu", "tau", "theta"), (20, False),
    ),
    "regression, a subsampled plate": (
        p_regression_model, p_regression_guide, n_regression_model, n_regression_guide, (REG_X, REG_Y),
        ("w", "sigma"), (5, True),
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        # 25 s each on the 2-core CI machine (4 compiled engines): the default suite keeps
        # the AutoNormal path by the plate-broadcast fit below.
        pytest.param("eight schools, exact scores", marks=pytest.mark.slow),
        pytest.param("regression, a subsampled plate", marks=pytest.mark.slow),
    ],
)
def test_a_user_guide_that_is_normal_in_the_unconstrained_space_is_fitted_as_autonormal(case):
    """A hand-written AutoNormal (Normals, a LogNormal on a positive site, a plate of
    Normals; AutoNormal's softplus scales) has AutoNormal's density in the unconstrained
    space, and the engine fits it as AutoNormal, its regime included (with a subsampled
    plate: K = 5 and the averaged iterate): from the same params, with the same particles
    and batches, 30 updates end where AutoNormal's do, up to float32 round-off (the same
    arithmetic, the loc and scale read from a run of the guide instead of AutoNormal's own
    params), in both backends."""
    from numpyro.infer import init_to_feasible
    from numpyro.infer.autoguide import AutoNormal as NAutoNormal
    from pyro.infer.autoguide import AutoNormal as PAutoNormal

    import pyro_psvi
    from numpyro_psvi import ProximalScoreVI as NProximalScoreVI

    p_model, p_guide, n_model, n_guide, data, names, regime = NORMAL_USER_GUIDES[case]
    p_data = tuple(map(torch.tensor, data))
    fitted = []
    for guide in (PAutoNormal(p_model), p_guide):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        engine = pyro_psvi.ProximalScoreVI(p_model, guide, pyro.optim.Adam({"lr": 0.05}))
        engine.evaluate_loss(*p_data)  # sets the engine up (its draws differ by guide), moves nothing
        assert (engine.inner_steps, engine.average_iterates) == regime
        for step in range(30):
            torch.manual_seed(step)  # the same particles and batches for both guides
            engine.step(*p_data)
        keys = ("{}_loc", "{}_scale") if guide is p_guide else ("AutoNormal.locs.{}", "AutoNormal.scales.{}")
        store = pyro.get_param_store()
        fitted.append({name: tuple(store[key.format(name)].detach() for key in keys) for name in names})
    for name in names:
        for auto, user in zip(fitted[0][name], fitted[1][name], strict=True):
            torch.testing.assert_close(user, auto, rtol=1e-4, atol=1e-5)
    # The fit moved from the common init (loc 0, scale 0.1).
    assert float(fitted[0][names[0]][0].abs().max()) > 0.1

    n_data = tuple(map(jnp.asarray, data))
    n_fitted = []
    for guide in (NAutoNormal(n_model, init_loc_fn=init_to_feasible), n_guide):
        engine = NProximalScoreVI(n_model, guide, numpyro.optim.Adam(0.05))
        state = engine.init(jax.random.PRNGKey(0), *n_data)
        update = jax.jit(engine.update)
        for step in range(30):
            state = update(state._replace(rng_key=jax.random.PRNGKey(step)), *n_data)[0]
        params = engine.get_params(state)
        suffixes = ("_loc", "_scale") if guide is n_guide else ("_auto_loc", "_auto_scale")
        n_fitted.append({name: tuple(params[name + suffix] for suffix in suffixes) for name in names})
    for name in names:
        for auto, user in zip(n_fitted[0][name], n_fitted[1][name], strict=True):
            np.testing.assert_allclose(user, auto, rtol=1e-4, atol=1e-5)
    assert float(np.abs(n_fitted[0][names[0]][0]).max()) > 0.1


def test_a_normal_guide_whose_plate_broadcasts_scalar_params_fits_its_target():
    """Shared scalar ``loc`` and ``scale`` broadcast by the guide's plate over a site of 4:
    the AutoNormal path spreads them over the site's 4 coordinates (the density is that
    of 4 iid Normals) and fits the exact posterior, here the prior N(1, 2^2) (no data),
    in both backends. Exact scores of a Gaussian: the fixed point is exact; 0.02 allows
    for float32 and the 300 steps' remaining distance (measured 4e-4)."""
    import pyro_psvi
    from numpyro_psvi import ProximalScoreVI as NProximalScoreVI

    def p_model():
        with pyro.plate("members", 4):
            pyro.sample("theta", pdist.Normal(1.0, 2.0))

    def p_guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=pconstraints.positive)
        with pyro.plate("members", 4):
            pyro.sample("theta", pdist.Normal(loc, scale))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    engine = pyro_psvi.ProximalScoreVI(p_model, p_guide, pyro.optim.Adam({"lr": 0.05}))
    for _ in range(300):
        engine.step()
    assert engine.density.loc_scale is not None
    assert abs(float(pyro.param("loc")) - 1.0) < 0.02 and abs(float(pyro.param("scale")) - 2.0) < 0.02

    def n_model():
        with numpyro.plate("members", 4):
            numpyro.sample("theta", ndist.Normal(1.0, 2.0))

    def n_guide():
        loc = numpyro.param("loc", 0.0)
        scale = numpyro.param("scale", 1.0, constraint=nconstraints.positive)
        with numpyro.plate("members", 4):
            numpyro.sample("theta", ndist.Normal(loc, scale))

    n_engine = NProximalScoreVI(n_model, n_guide, numpyro.optim.Adam(0.05))
    params = n_engine.run(jax.random.PRNGKey(0), 300, progress_bar=False).params
    assert abs(float(params["loc"]) - 1.0) < 0.02 and abs(float(params["scale"]) - 2.0) < 0.02
