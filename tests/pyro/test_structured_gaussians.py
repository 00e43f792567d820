"""Pyro's structured Gaussian guides, AutoGaussian (dense backend) and AutoStructured:
their densities against the guides' own draws, and exact fits of a Gaussian hierarchical
model whose posterior is in both families."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGaussian, AutoStructured
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from pyro_psvi import ProximalScoreVI
from pyro_psvi.guides import guide_density

pytestmark = pytest.mark.usefixtures("fresh_pyro")

Y = torch.tensor([1.5, -0.5, 3.0])
PRIOR_SD = 5.0


def model(y=Y):
    """``mu ~ N(0, 5^2)``, ``theta_j ~ N(mu, 1)``, ``y_j ~ N(theta_j, 1)``: the posterior of
    ``(mu, theta)`` is Gaussian, its precision zero between the ``theta_j`` (given ``mu``
    they are independent), the sparsity AutoGaussian's dependency structure gives it."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("j", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def scaled_model(y=Y):
    """As ``model``, with a positive site (a HalfNormal scale fixed by a tight prior)
    between them, to check the flat layout through a constrained site."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.3))
    with pyro.plate("j", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, s))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def exact_posterior():
    """Mean and covariance of ``(mu, theta_1..3)`` from the joint precision."""
    n = len(Y)
    precision = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    precision[0, 0] = 1 / PRIOR_SD**2 + n
    precision[0, 1:] = precision[1:, 0] = -1.0
    precision[1:, 1:] = 2 * torch.eye(n, dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    return cov @ torch.cat([torch.zeros(1, dtype=torch.float64), Y.double()]), cov


def unconstraining(fit_model):
    """``{latent site: map to its unconstrained value}`` (the guide's own sites are Deltas,
    whose support says nothing of the model's)."""
    trace = poutine.trace(fit_model).get_trace()
    return {
        name: biject_to(site["fn"].support).inv
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def perturbed(guide, seed=0):
    """Set ``guide`` up and move every param off its start; its density and params."""
    pyro.set_rng_seed(seed)
    guide()
    density = guide_density(guide)
    store = pyro.get_param_store()
    with torch.no_grad():
        for name in density.param_names:
            leaf = store.get_param(name).unconstrained()
            leaf.add_(0.3 * torch.randn_like(leaf))
    params = {name: store.get_param(name).detach() for name in density.param_names}
    return density, params


def test_autogaussian_density_equals_the_guides_own_draws():
    """Each draw of the guide: its auxiliary MVN value ``a`` (Pyro's site) and latent
    values; at their unconstrained flat ``u = loc + scale * a`` our log density is the
    auxiliary one minus ``sum(log scale)`` (the affine map's Jacobian), and our score is
    its autograd gradient (float32 round-off)."""
    guide = AutoGaussian(scaled_model)
    density, params = perturbed(guide)
    transforms = unconstraining(scaled_model)
    assert [site.name for site in density.sites] == ["mu", "s", "theta"] and density.latent_dim == 5
    log_scale = sum(
        torch.log(params[f"AutoGaussianDense.scales.{site.name}"]).sum() for site in density.sites
    )
    for _ in range(4):
        trace = poutine.trace(guide).get_trace()
        aux = trace.nodes["_AutoGaussianDense_latent"]
        u = torch.cat(
            [transforms[site.name](trace.nodes[site.name]["value"]).reshape(-1) for site in density.sites]
        ).detach()[None]
        expected = aux["fn"].log_prob(aux["value"]).detach() - log_scale
        torch.testing.assert_close(density.log_prob(params, u), expected.reshape(1), rtol=1e-5, atol=1e-5)
        u = u.requires_grad_(True)
        grad = torch.autograd.grad(density.log_prob(params, u).sum(), u)[0]
        torch.testing.assert_close(density.score(params, u.detach()), grad, rtol=1e-4, atol=1e-5)


def test_autogaussian_draws_have_the_guides_moments():
    """Our draws against the guide's own (20,000 each): means within 5 standard errors of
    their difference, variances within 5 relative sds (``sqrt(2 / n)`` each) of each other."""
    guide = AutoGaussian(scaled_model)
    density, params = perturbed(guide, seed=1)
    transforms = unconstraining(scaled_model)
    n = 20_000
    ours = density.sample(params, n).double()
    with torch.no_grad(), pyro.plate("draws", n, dim=-2):
        trace = poutine.trace(guide).get_trace()
    theirs = torch.cat(
        [transforms[s.name](trace.nodes[s.name]["value"]).reshape(n, -1) for s in density.sites],
        dim=-1,
    ).double()
    se = (ours.var(0) / n + theirs.var(0) / n).sqrt()
    assert torch.all((ours.mean(0) - theirs.mean(0)).abs() < 5 * se)
    torch.testing.assert_close(ours.var(0), theirs.var(0), rtol=5 * (2 * 2 / n) ** 0.5, atol=0)


def test_structured_density_equals_the_guides_own_draws():
    """AutoStructured ('mvn' and 'normal' conditionals, linear dependencies): at the
    unconstrained flat value of each of the guide's draws our log density is the
    standard normal density of its auxiliary draws plus its Delta sites' log densities
    (``-log|det B_d|`` and the constraining map's ``log|du/dx|``) minus that map's
    ``log|du/dx|``; our score is its autograd gradient (float32 round-off)."""
    guide = AutoStructured(
        scaled_model,
        conditionals={"mu": "normal", "s": "normal", "theta": "mvn"},
        dependencies={"s": {"mu": "linear"}, "theta": {"mu": "linear", "s": "linear"}},
    )
    density, params = perturbed(guide)
    assert [site.name for site in density.sites] == ["mu", "s", "theta"] and density.latent_dim == 5
    transforms = unconstraining(scaled_model)
    for _ in range(4):
        trace = poutine.trace(guide).get_trace()
        u_sites = {name: transforms[name](trace.nodes[name]["value"]) for name in transforms}
        u = torch.cat([u_sites[site.name].reshape(-1) for site in density.sites]).detach()[None]
        expected = sum(
            trace.nodes[f"{name}_aux"]["fn"].log_prob(trace.nodes[f"{name}_aux"]["value"]).sum()
            + trace.nodes[name]["fn"].log_density.sum()
            - transforms[name].log_abs_det_jacobian(trace.nodes[name]["value"], u_sites[name]).sum()
            for name in transforms
        ).detach()
        torch.testing.assert_close(density.log_prob(params, u), expected.reshape(1), rtol=1e-5, atol=1e-5)
        u = u.requires_grad_(True)
        grad = torch.autograd.grad(density.log_prob(params, u).sum(), u)[0]
        torch.testing.assert_close(density.score(params, u.detach()), grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("guide_cls", [AutoGaussian, AutoStructured])
def test_fits_a_gaussian_hierarchy_exactly(guide_cls):
    """The exact posterior is in both families (AutoStructured's defaults, 'mvn'
    conditionals and linear dependencies from the model's posterior dependencies,
    ``theta`` on ``mu``, make ``M = (I - W)^-1 B`` a general lower-triangular factor
    here) and, with exact scores, the fixed point: after 100 updates (from the guide's
    start, 1-3 posterior sds away), means within 0.05 posterior sd and covariance
    entries within 5% of the largest variance (the 200,000 draws' own error is ~0.01 of
    each; the rest is the last updates' particles and float32; no mini-batch noise)."""
    pyro.set_rng_seed(0)
    guide = guide_cls(model)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    for _ in range(100):
        svi.step()
    assert svi.num_rejected == 0
    density = guide_density(guide)
    params = {name: pyro.param(name).detach() for name in density.param_names}
    draws = density.sample(params, 200_000).double()
    mean, cov = exact_posterior()
    sd = cov.diagonal().sqrt()
    assert torch.all((draws.mean(0) - mean).abs() < 0.05 * sd)
    assert torch.all((torch.cov(draws.T) - cov).abs() < 0.05 * cov.diagonal().max())
