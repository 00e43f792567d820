"""Guide densities (Pyro): closed-form pieces against Pyro's own distributions and autograd."""

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import (
    ComposeTransformModule,
    affine_coupling,
    block_autoregressive,
    iterated,
    permute,
    spline_coupling,
)
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

from pyro_psvi.guides import guide_density, guide_family
from pyro_psvi.objective import fisher_statistics, proximal_objective, transport_objective, transport_path

GUIDES = [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal]


def model():
    pyro.sample("a", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("s", dist.HalfNormal(1.0))
    pyro.sample("p", dist.Dirichlet(torch.ones(3)))


def set_up(guide_cls, seed=0):
    """Set the guide up, then perturb every param so that nothing is at its init.

    Returns the guide, its density and the constrained params by param-store name.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = guide_cls(model)
    guide()
    density = guide_density(guide)
    store = pyro.get_param_store()
    with torch.no_grad():
        for name in density.param_names:
            leaf = store.get_param(name).unconstrained()
            leaf.add_(0.3 * torch.randn_like(leaf))
    params = {name: store.get_param(name).detach() for name in density.param_names}
    return guide, density, params


def reference_log_prob(guide, density, u):
    """Pyro's own density of the guide at flat latents ``u (S, D)``."""
    if isinstance(guide, AutoNormal):
        return sum(
            dist.Normal(*guide._get_loc_and_scale(name)).log_prob(value).reshape(len(u), -1).sum(-1)
            for name, value in density.unpack(u).items()
        )
    return guide.get_posterior().log_prob(u)


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_log_prob_matches_pyro(guide_cls):
    guide, density, params = set_up(guide_cls)
    u = density.sample(params, 5)
    assert u.shape == (5, density.latent_dim) == (5, 6)
    torch.testing.assert_close(density.log_prob(params, u), reference_log_prob(guide, density, u))


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_sample_moments(guide_cls):
    """Draws have the guide's mean and covariance (5 standard errors on 20,000 draws)."""
    guide, density, params = set_up(guide_cls)
    draws = density.sample(params, 20000).double()
    posterior_loc, posterior_cov = _loc_cov(guide, density)
    se = posterior_cov.diagonal().sqrt() / 20000**0.5
    assert torch.all((draws.mean(0) - posterior_loc).abs() < 5 * se)
    # Relative sd of a sample variance is sqrt(2 / n) = 0.01; allow 5 of them.
    torch.testing.assert_close(draws.var(0), posterior_cov.diagonal(), rtol=0.05, atol=0)


def _loc_cov(guide, density):
    if isinstance(guide, AutoNormal):
        locs, scales = zip(*(guide._get_loc_and_scale(s.name) for s in density.sites), strict=True)
        loc = torch.cat([x.reshape(-1) for x in locs])
        scale = torch.cat([x.reshape(-1) for x in scales])
        return loc.detach().double(), torch.diag(scale.detach().double() ** 2)
    posterior = guide.get_posterior()
    if isinstance(guide, AutoDiagonalNormal):
        return posterior.mean.detach().double(), torch.diag(posterior.variance.detach().double())
    return posterior.loc.detach().double(), posterior.covariance_matrix.detach().double()


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_closed_form_score_and_objective_gradients_match_autograd(guide_cls):
    guide, closed, params = set_up(guide_cls)
    autograd = guide_density(guide, score_method="autodiff")
    u = closed.sample(params, 4)
    torch.testing.assert_close(closed.score(params, u), autograd.score(params, u))
    # Objective gradients in the unconstrained params (what the optimizer sees).
    scores = torch.randn_like(u)
    store = pyro.get_param_store()
    constraints = store.get_state()["constraints"]
    leaves0 = {k: store.get_param(k).unconstrained().detach() for k in params}
    params_t = {k: torch.distributions.transform_to(constraints[k])(v + 0.1) for k, v in leaves0.items()}
    grads = []
    for density in (closed, autograd):
        leaves = {k: v.clone().requires_grad_(True) for k, v in leaves0.items()}
        constrained = {k: torch.distributions.transform_to(constraints[k])(v) for k, v in leaves.items()}
        loss, _ = proximal_objective(
            density, constrained, params_t, u, scores, prox_weight=3.0, weighting="covariance"
        )
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for g_closed, g_auto in zip(*grads, strict=True):
        torch.testing.assert_close(g_closed, g_auto, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
@pytest.mark.parametrize("weighting", ["covariance", "identity"])
@pytest.mark.parametrize("local", [False, True])
def test_diagonal_statistics_give_the_same_objective_and_gradients(guide_cls, weighting, local):
    """The O(D) objective of a diagonal guide (five per-coordinate sums over particles)
    equals the particle-wise one in value and in its gradient, away from q_t too: it is
    an algebraic identity, so float64 agreement to rounding is required."""
    guide, density, params = set_up(guide_cls)
    assert density.loc_scale is not None
    assert guide_density(guide, score_method="autodiff").loc_scale is None  # no shortcut then
    params = {k: v.double() for k, v in params.items()}
    generator = torch.Generator().manual_seed(1)
    u = density.sample(params, 5).double()
    scores = torch.randn(u.shape, generator=generator, dtype=torch.float64)
    weights = torch.rand(u.shape[1], generator=generator, dtype=torch.float64) * 3 if local else None
    stats = fisher_statistics(density, params, u, scores)
    noise = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in params.items()}
    leaves = {k: (v + 0.2 * noise[k]).requires_grad_(True) for k, v in params.items()}
    results = []
    for use_stats in (False, True):
        moved = {k: v.abs() + 0.05 if ("scale" in k) else v for k, v in leaves.items()}
        loss, _ = proximal_objective(
            density, moved, params, u, scores, prox_weight=3.0, weighting=weighting, weights=weights,
            stats=stats if use_stats else None,
        )  # fmt: skip
        results.append((loss, torch.autograd.grad(loss, list(leaves.values()))))
    (loss, grads), (loss_stats, grads_stats) = results
    torch.testing.assert_close(loss_stats, loss, rtol=1e-10, atol=1e-10)
    for g_stats, g in zip(grads_stats, grads, strict=True):
        torch.testing.assert_close(g_stats, g, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_kl_and_covariance_weighting(guide_cls):
    guide, density, params0 = set_up(guide_cls, seed=0)
    loc0, cov0 = _loc_cov(guide, density)
    guide, density, params1 = set_up(guide_cls, seed=1)
    loc1, cov1 = _loc_cov(guide, density)
    q0 = dist.MultivariateNormal(loc0, cov0)
    q1 = dist.MultivariateNormal(loc1, cov1)
    expected = torch.distributions.kl_divergence(q0, q1)
    torch.testing.assert_close(density.kl(params0, params1).double(), expected, rtol=1e-4, atol=1e-5)
    assert float(density.kl(params1, params1)) == pytest.approx(0.0, abs=1e-5)
    r = torch.randn(3, density.latent_dim)
    quad = torch.einsum("si,ij,sj->s", r.double(), cov1, r.double())
    torch.testing.assert_close(density.cov_quad(params1, r).double(), quad, rtol=1e-4, atol=1e-5)


def test_block_autoregressive_flow_is_refused_clearly():
    bnaf = AutoNormalizingFlow(model, partial(iterated, 2, block_autoregressive))
    with pytest.raises(TypeError, match="block-autoregressive flow"):
        guide_family(bnaf).check_supported()


def _flip(dim):
    return permute(dim, torch.flip(torch.arange(dim), [0]))


FLOWS = {
    "iaf": lambda m: AutoIAFNormal(m, hidden_dim=[8], num_transforms=2),
    "affine_coupling": lambda m: AutoNormalizingFlow(
        m,
        lambda d: ComposeTransformModule(
            [affine_coupling(d, hidden_dims=[8]), _flip(d), affine_coupling(d, hidden_dims=[8])]
        ),
    ),
    "spline_coupling": lambda m: AutoNormalizingFlow(
        m, lambda d: ComposeTransformModule([spline_coupling(d, hidden_dims=[8]), _flip(d)])
    ),
}


def _perturb_flow(guide):
    with torch.no_grad():
        for _, param in guide.transform.named_parameters():
            param.add_(0.1 * torch.randn_like(param))


def _perturbed_flow(name: str):
    """The flow ``FLOWS[name]`` set up under seed 0 with its params perturbed, and its
    density."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = FLOWS[name](model)
    guide()
    _perturb_flow(guide)
    return guide, guide_density(guide)


@pytest.mark.parametrize("name", list(FLOWS))
def test_flow_density_matches_pyro_and_ignores_stale_caches(name):
    """The density at given points equals Pyro's own ``log_prob`` (on fresh tensors),
    also at draws made before the params changed (which Pyro's transforms may hold in
    their one-entry caches, computed with the old params)."""
    guide, density = _perturbed_flow(name)
    with torch.no_grad():
        draws = guide.get_posterior().rsample((6,))  # this tensor is cached by Pyro's transforms
    _perturb_flow(guide)  # an optimizer step: same tensors, new values
    params = {k: pyro.param(k).detach() for k in density.param_names}
    ours = density.log_prob(params, draws)
    fresh = guide.get_posterior().log_prob(draws.clone())
    torch.testing.assert_close(ours, fresh, rtol=1e-4, atol=1e-4)
    # The score is the gradient of that log density; the KL of a guide to itself is 0
    # (the same seeded draws on both sides).
    u = draws.clone().requires_grad_(True)
    expected = torch.autograd.grad(guide.get_posterior().log_prob(u).sum(), u)[0]
    torch.testing.assert_close(density.score(params, draws), expected, rtol=1e-3, atol=1e-3)
    assert abs(float(density.kl(params, params, 7))) < 1e-4


def test_flow_proximal_term_is_the_displacement_of_its_map():
    """A flow's ``kl`` is ``0.5 mean_z sum_d (T1(z) - T0(z))_d^2 / var0_d`` on 256 seeded
    standard normal base draws, recomputed here with Pyro's own transform on fresh
    tensors (float32 round-off: rtol 1e-4); one seed gives the same draws every call
    (common random numbers); at ``params1 = params0`` it and its gradient are 0."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = FLOWS["affine_coupling"](model)
    guide()
    density = guide_density(guide)
    z = torch.randn((256, density.latent_dim), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        start = guide.transform(z.clone())
    params0 = {k: pyro.param(k).detach().clone() for k in density.param_names}
    _perturb_flow(guide)
    params1 = {k: pyro.param(k).detach() for k in density.param_names}
    with torch.no_grad():
        moved = guide.transform(z.clone())
    expected = 0.5 * ((moved - start).pow(2) / start.var(0, correction=0)).sum(-1).mean()
    assert float(expected) > 0.1
    torch.testing.assert_close(density.kl(params0, params1, 3), expected, rtol=1e-4, atol=0)
    assert torch.equal(density.kl(params0, params1, 3), density.kl(params0, params1, 3))
    leaves = {k: v.clone().requires_grad_(True) for k, v in params0.items()}
    value = density.kl(params0, leaves, 3)
    grads = torch.autograd.grad(value, list(leaves.values()))
    assert float(value.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_a_flow_with_exact_scores_steps_with_its_faded_fisher_term_until_past_the_budget():
    """At most five inner steps, stopped after the first that moves the map further than
    the trust region's budget: one step when Adam(1) leaves it at once, all five when
    Adam(1e-6) stays within it (the optimizer's step counts); the Fisher term kept, weighted
    by ``fisher_fade``; the iterates averaged. Without a trust region: twenty unstopped
    steps and the last iterate, as before the stop."""
    from psvi.objective import TRANSPORT_FISHER_WEIGHT
    from pyro_psvi import ProximalScoreVI

    for lr, steps in ((1.0, 1), (1e-6, 5)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        optim = pyro.optim.Adam({"lr": lr})
        svi = ProximalScoreVI(model, FLOWS["iaf"](model), optim)
        svi.step()
        assert (svi.inner_steps, svi.average_iterates, svi.stops_at_budget) == (5, True, True)
        assert svi.transport_fisher_weight == TRANSPORT_FISHER_WEIGHT and svi.num_rejected == 0
        assert {int(state["state"][0]["step"]) for state in optim.get_state().values()} == {steps}
    pyro.clear_param_store()
    svi = ProximalScoreVI(model, FLOWS["iaf"](model), pyro.optim.Adam({"lr": 1e-2}), trust_region=None)
    svi.step()
    assert (svi.inner_steps, svi.average_iterates, svi.stops_at_budget) == (20, False, False)


def test_a_flows_fisher_term_is_weighted_by_its_fade():
    """``transport_path`` carries ``fisher_fade`` of the Fisher term at ``q_t``, and the
    objective's Fisher term is weighted by it: the objective at weight ``w`` minus the one
    at weight 0 is ``w * fade * F``."""
    guide, density = _perturbed_flow("iaf")
    params_t = {k: pyro.param(k).detach().clone() for k in density.param_names}
    particles = density.transport.push(params_t, torch.randn(4, density.latent_dim)).detach()
    scores = -particles  # a standard normal target's
    path = transport_path(density, params_t, particles, torch.ones_like(particles), torch.tensor(12.0))
    assert float(path.fisher_scale) == pytest.approx(1 / (1 + 12.0 / 6), rel=1e-6)  # r = F_t / D, D = 6
    params = {k: v + 0.05 for k, v in params_t.items()}
    kwargs = dict(prox_weight=10.0, weighting="covariance", kl_seed=1)
    terms = [transport_objective(density, params, params_t, particles, scores, path, fisher_weight=weight,
                                 **kwargs) for weight in (0.1, 0.0)]  # fmt: skip
    fisher = terms[0][1]["fisher"]
    expected = 0.1 * path.fisher_scale * fisher
    torch.testing.assert_close(terms[0][0] - terms[1][0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["iaf", "affine_coupling"])
def test_flow_path_elbo_term_has_the_reparameterized_elbo_gradient(name):
    """At ``q_t`` the gradient in the flow's params of its linearized path ``-ELBO`` is
    the reparameterized ("sticking the landing") ``-ELBO`` gradient on the particles'
    base draws, ``-mean_s J_s' (grad log p - grad log q_t)(x_s)``: an identity, for any
    ``log p`` (here not a Gaussian); ``transport_path`` recovers the base draws."""
    guide, density = _perturbed_flow(name)
    params_t = {k: pyro.param(k).detach().clone() for k in density.param_names}
    z = torch.randn(5, density.latent_dim)

    def log_p(u):
        return -0.5 * (u - 1).pow(2).sum(-1) + torch.sin(u).sum(-1)

    particles = density.transport.push(params_t, z).detach().requires_grad_(True)
    scores = torch.autograd.grad(log_p(particles).sum(), particles)[0]
    particles = particles.detach()
    residuals_t = density.score(params_t, particles).detach() - scores
    path = transport_path(density, params_t, particles, residuals_t, torch.tensor(3.0))
    torch.testing.assert_close(path.base, z, rtol=1e-4, atol=1e-4)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params_t.items()}
    terms = transport_objective(
        density,
        leaves,
        params_t,
        particles,
        scores,
        path,
        prox_weight=10.0,
        weighting="covariance",
        kl_seed=1,
    )[1]
    ours = torch.autograd.grad(terms["path_elbo"], list(leaves.values()), allow_unused=True)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params_t.items()}
    u = density.transport.push(leaves, z)
    sticking_the_landing = -(log_p(u) - density.log_prob(params_t, u)).mean()
    expected = torch.autograd.grad(sticking_the_landing, list(leaves.values()), allow_unused=True)
    for mine, theirs in zip(ours, expected, strict=True):
        if theirs is None:
            assert mine is None or float(mine.abs().max()) == 0.0
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-5)

    # Without the Fisher term (mini-batch scores) the objective's gradient at q_t is the
    # path term's weight times that gradient: the displacement's is zero there.
    leaves = {k: v.clone().requires_grad_(True) for k, v in params_t.items()}
    value, terms = transport_objective(
        density, leaves, params_t, particles, scores, path,
        prox_weight=10.0, weighting="covariance", kl_seed=1, fisher_weight=0.0,
    )  # fmt: skip
    assert "fisher" not in terms
    ours = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    for mine, theirs in zip(ours, expected, strict=True):
        if theirs is None:
            assert mine is None or float(mine.abs().max()) == 0.0
        else:
            torch.testing.assert_close(mine, path.weight * theirs, rtol=1e-3, atol=1e-4)
