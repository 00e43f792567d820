"""Guide densities: closed-form pieces against NumPyro's own distributions and autodiff."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import seed, trace
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from numpyro_psvi import ProximalScoreMatching
from numpyro_psvi.guides import guide_density
from numpyro_psvi.objective import fisher_statistics, proximal_objective, transport_objective, transport_path

GUIDES = [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal]


def model():
    numpyro.sample("a", dist.Normal(0, 1).expand([3]).to_event(1))
    numpyro.sample("s", dist.HalfNormal(1.0))
    numpyro.sample("p", dist.Dirichlet(jnp.ones(3)))


def random_params(guide_cls, key):
    """Set the guide up, then perturb every param so that nothing is at its init."""
    guide = guide_cls(model)
    tr = trace(seed(guide, key)).get_trace()
    params = {}
    for i, (name, site) in enumerate(sorted((n, s) for n, s in tr.items() if s["type"] == "param")):
        value = site["value"]
        noise = 0.3 * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(value))
        if "scale_tril" in name:
            value = jnp.tril(value + 0.1 * noise) + jnp.eye(value.shape[0]) * 0.5
        elif "scale" in name:
            value = value * jnp.exp(noise)
        else:
            value = value + noise
        params[name] = value
    return guide, params


def reference_log_prob(guide, params, u):
    if isinstance(guide, AutoNormal):
        unpacked = guide_density(guide).unpack(u)
        return sum(
            dist.Normal(params[f"{k}_auto_loc"], params[f"{k}_auto_scale"]).log_prob(v).sum()
            for k, v in unpacked.items()
        )
    return jnp.sum(guide.get_posterior(params).log_prob(u))


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_log_prob_matches_numpyro(guide_cls):
    guide, params = random_params(guide_cls, jax.random.PRNGKey(0))
    density = guide_density(guide)
    u = density.sample(params, jax.random.PRNGKey(1), 5)
    ours = jax.vmap(density.log_prob, (None, 0))(params, u)
    ref = jnp.stack([reference_log_prob(guide, params, x) for x in u])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_closed_form_and_autodiff_scores_agree(guide_cls):
    guide, params = random_params(guide_cls, jax.random.PRNGKey(2))
    closed = guide_density(guide, "closed_form")
    auto = guide_density(guide, "autodiff")
    assert closed.closed_form and not auto.closed_form
    u = closed.sample(params, jax.random.PRNGKey(3), 6)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(closed.score, (None, 0)))(params, u),
        jax.jit(jax.vmap(auto.score, (None, 0)))(params, u),
        rtol=1e-4,
        atol=1e-4,
    )
    # ... and so do the objective's gradients in the guide params (nested autodiff).
    _, params_t = random_params(guide_cls, jax.random.PRNGKey(4))
    scores = jax.random.normal(jax.random.PRNGKey(5), u.shape)

    def grad_of(density):
        def loss(p):
            return proximal_objective(
                density, p, params_t, u, scores, None, prox_weight=1.0, weighting="covariance"
            )[0]

        return jax.jit(jax.grad(loss))(params)

    g_closed, g_auto = grad_of(closed), grad_of(auto)
    for name in params:
        np.testing.assert_allclose(g_closed[name], g_auto[name], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
@pytest.mark.parametrize("weighting", ["covariance", "identity"])
@pytest.mark.parametrize("local", [False, True])
def test_diagonal_statistics_give_the_same_objective_and_gradients(guide_cls, weighting, local):
    """The O(D) objective of a diagonal guide (five per-coordinate sums over particles)
    equals the particle-wise one in value and gradient, away from q_t too. An algebraic
    identity: in float32 the two summation orders differ by ~1e-6 relative, while any
    slip in the algebra (a sign, a factor) is an O(1) difference."""
    guide, params_t = random_params(guide_cls, jax.random.PRNGKey(2))
    _, params = random_params(guide_cls, jax.random.PRNGKey(9))
    density = guide_density(guide)
    assert density.loc_scale is not None and guide_density(guide, "autodiff").loc_scale is None
    u = density.sample(params_t, jax.random.PRNGKey(3), 5)
    scores = jax.random.normal(jax.random.PRNGKey(5), u.shape)
    weights = 3 * jax.random.uniform(jax.random.PRNGKey(6), (u.shape[1],)) if local else None
    stats = fisher_statistics(density, params_t, u, scores)

    def loss(p, use_stats):
        return proximal_objective(
            density, p, params_t, u, scores, None, prox_weight=3.0, weighting=weighting, weights=weights,
            stats=stats if use_stats else None,
        )[0]  # fmt: skip

    np.testing.assert_allclose(loss(params, True), loss(params, False), rtol=1e-4)
    g_stats, g = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
    for name in params:
        np.testing.assert_allclose(g_stats[name], g[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guide_cls", GUIDES)
def test_kl_and_covariance_weighting(guide_cls):
    """Closed-form KL against a Monte Carlo estimate, and r' Cov r against the dense Cov."""
    guide, p0 = random_params(guide_cls, jax.random.PRNGKey(6))
    _, p1 = random_params(guide_cls, jax.random.PRNGKey(7))
    density = guide_density(guide)
    kl = density.kl(p0, p1, None)
    draws = density.sample(p0, jax.random.PRNGKey(8), 200_000)
    lp = jax.vmap(density.log_prob, (None, 0))
    diff = lp(p0, draws) - lp(p1, draws)
    # Monte Carlo standard error of the estimate: 5 of them bound a correct KL.
    assert abs(float(diff.mean() - kl)) < 5 * float(diff.std()) / np.sqrt(len(diff))
    assert float(density.kl(p0, p0, None)) == pytest.approx(0.0, abs=1e-4)
    cov = np.cov(np.asarray(draws[:50_000]).T)
    r = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (density.latent_dim,)))
    # Sample covariance of 50k draws: relative error about sqrt(2/50k) ~ 0.6%.
    assert float(density.cov_quad(p0, jnp.asarray(r))) == pytest.approx(r @ cov @ r, rel=0.05)


@pytest.mark.parametrize(
    "guide_cls",
    # The low-rank case (17 s) is slow: the generic path does not depend on the guide, and
    # the low-rank closed forms are checked against autodiff above (suite budget).
    [AutoMultivariateNormal, pytest.param(AutoLowRankMultivariateNormal, marks=pytest.mark.slow)],
)
def test_generic_path_matches_closed_form(guide_cls):
    """The path for guides without closed forms (get_posterior + nested autodiff +
    Monte Carlo KL), run on a Gaussian guide, agrees with the closed forms."""
    from numpyro_psvi.guides import _auto_continuous
    from psvi.families import DensityOptions

    guide, p0 = random_params(guide_cls, jax.random.PRNGKey(10))
    _, p1 = random_params(guide_cls, jax.random.PRNGKey(11))
    closed = guide_density(guide)
    num_draws = 20_000
    generic = _auto_continuous(guide, DensityOptions(num_kl_draws=num_draws))
    assert not generic.closed_form
    u = closed.sample(p0, jax.random.PRNGKey(12), 5)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(generic.score, (None, 0)))(p0, u),
        jax.jit(jax.vmap(closed.score, (None, 0)))(p0, u),
        rtol=1e-4,
        atol=1e-4,
    )
    draws = closed.sample(p0, jax.random.PRNGKey(13), num_draws)
    lp = jax.jit(jax.vmap(closed.log_prob, (None, 0)))
    diff_sd = float(jnp.std(lp(p0, draws) - lp(p1, draws)))
    mc_kl = float(jax.jit(generic.kl)(p0, p1, jax.random.PRNGKey(14)))
    # Monte Carlo KL on 20k draws: standard error diff_sd / sqrt(20k); allow 5 of them.
    assert abs(mc_kl - float(closed.kl(p0, p1, None))) < 5 * diff_sd / np.sqrt(num_draws)


def test_iaf_guide_runs_through_its_transport_path():
    from numpyro.infer.autoguide import AutoIAFNormal

    from numpyro_psvi import ProximalScoreVI

    def model():
        numpyro.sample("x", dist.Normal(jnp.zeros(2), 1.0).to_event(1))

    guide = AutoIAFNormal(model, num_flows=1, hidden_dims=[4])
    svi = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2), ProximalScoreMatching(num_kl_draws=32))
    result = svi.run(jax.random.PRNGKey(0), 50, progress_bar=False)
    assert not svi.density.closed_form
    assert svi.density.transport is not None
    assert int(result.state.num_rejected) == 0
    assert np.isfinite(np.asarray(result.losses)).all()


def test_a_flow_with_exact_scores_steps_with_its_faded_fisher_term_until_past_the_budget():
    """At most five inner steps, stopped after the first that moves the map further than
    the trust region's budget: one step when Adam(1) leaves it at once, all five when
    Adam(1e-6) stays within it (the optimizer's step count); the Fisher term kept, weighted
    by ``fisher_fade``; the iterates averaged. Without a trust region: twenty unstopped
    steps and the last iterate, as before the stop."""
    from numpyro.infer.autoguide import AutoIAFNormal

    from numpyro_psvi import ProximalScoreVI
    from psvi.objective import TRANSPORT_FISHER_WEIGHT

    for step_size, steps in ((1.0, 1), (1e-6, 5)):
        guide = AutoIAFNormal(model, num_flows=1, hidden_dims=[8])
        svi = ProximalScoreVI(model, guide, numpyro.optim.Adam(step_size))
        state = svi.init(jax.random.PRNGKey(0))
        assert (svi.inner_steps, svi.average_iterates, svi.stops_at_budget) == (5, True, True)
        assert svi.transport_fisher_weight == TRANSPORT_FISHER_WEIGHT
        state, _ = jax.jit(svi.update)(state)
        assert int(state.num_rejected) == 0 and int(state.optim_state[0]) == steps
    svi = ProximalScoreVI(model, AutoIAFNormal(model, num_flows=1, hidden_dims=[8]), numpyro.optim.Adam(1e-2),
                          trust_region=None)  # fmt: skip
    svi.init(jax.random.PRNGKey(0))
    assert (svi.inner_steps, svi.average_iterates, svi.stops_at_budget) == (20, False, False)


def test_a_flows_fisher_term_is_weighted_by_its_fade():
    """``transport_path`` carries ``fisher_fade`` of the Fisher term at ``q_t``, and the
    objective's Fisher term is weighted by it: the objective at weight ``w`` minus the one
    at weight 0 is ``w * fade * F``."""
    guide, params = _iaf_params(jax.random.PRNGKey(0))
    density = guide_density(guide)
    params_t = _iaf_params(jax.random.PRNGKey(1))[1]
    particles = guide.get_transform(params_t)(guide.get_base_dist().sample(jax.random.PRNGKey(2), (4,)))
    scores = -particles  # a standard normal target's
    path = transport_path(density, params_t, particles, jnp.ones_like(particles), jnp.asarray(12.0))
    assert float(path.fisher_scale) == pytest.approx(1 / (1 + 12.0 / 6), rel=1e-6)  # r = F_t / D, D = 6
    kwargs = dict(prox_weight=10.0, weighting="covariance")
    terms = [transport_objective(density, params, params_t, particles, scores, path, jax.random.PRNGKey(3),
                                 fisher_weight=weight, **kwargs) for weight in (0.1, 0.0)]  # fmt: skip
    fisher = terms[0][1]["fisher"]
    np.testing.assert_allclose(terms[0][0] - terms[1][0], 0.1 * path.fisher_scale * fisher, rtol=1e-5)


def _iaf_params(key):
    """An AutoIAFNormal (2 flows) on ``model``'s 6 unconstrained coordinates, its params
    perturbed away from the init (whose last layers are near zero)."""
    from numpyro.infer.autoguide import AutoIAFNormal

    guide = AutoIAFNormal(model, num_flows=2, hidden_dims=[8])
    tr = trace(seed(guide, key)).get_trace()
    params = {n: s["value"] for n, s in tr.items() if s["type"] == "param"}
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
    return guide, jax.tree.unflatten(tree, leaves)


def test_flow_proximal_term_is_the_displacement_of_its_map():
    """A flow's ``kl`` is ``0.5 mean_z sum_d (T1(z) - T0(z))_d^2 / var0_d`` on 256 base
    draws of its key, recomputed here with NumPyro's own transform (float32 round-off:
    rtol 1e-4); at ``params1 = params0`` it and its gradient are 0 (to round-off; the
    gradient at ``params1`` is about 1 here)."""
    guide, params1 = _iaf_params(jax.random.PRNGKey(0))
    params0 = _iaf_params(jax.random.PRNGKey(1))[1]
    density = guide_density(guide)
    key = jax.random.PRNGKey(3)
    z = guide.get_base_dist().sample(key, (256,))
    start, moved = jax.jit(lambda p0, p1: (guide.get_transform(p0)(z), guide.get_transform(p1)(z)))(
        params0, params1
    )
    expected = 0.5 * jnp.mean(jnp.sum((moved - start) ** 2 / jnp.var(start, axis=0), axis=-1))
    assert float(expected) > 0.1
    np.testing.assert_allclose(jax.jit(density.kl)(params0, params1, key), expected, rtol=1e-4)
    value, grads = jax.jit(jax.value_and_grad(density.kl, argnums=1))(params0, params0, key)
    # 0 up to float32 round-off of T0(z) computed twice in one compiled program.
    assert abs(float(value)) < 1e-10
    assert all(float(jnp.max(jnp.abs(g))) < 1e-5 for g in jax.tree.leaves(grads))


def test_flow_path_elbo_term_has_the_reparameterized_elbo_gradient():
    """At ``q_t`` the gradient in the flow's params of its linearized path ``-ELBO`` is
    the reparameterized ("sticking the landing") ``-ELBO`` gradient on the particles'
    base draws, ``-mean_s J_s' (grad log p - grad log q_t)(x_s)``: an identity, for any
    ``log p`` (here not a Gaussian); ``transport_path`` recovers the base draws."""
    guide, params_t = _iaf_params(jax.random.PRNGKey(0))
    density = guide_density(guide)
    z = jax.random.normal(jax.random.PRNGKey(4), (5, density.latent_dim))

    def log_p(u):
        return -0.5 * jnp.sum((u - 1) ** 2, -1) + jnp.sum(jnp.sin(u), -1)

    particles = density.transport.push(params_t, z)
    scores = jax.grad(lambda u: jnp.sum(log_p(u)))(particles)
    residuals_t = jax.vmap(density.score, (None, 0))(params_t, particles) - scores
    path = jax.jit(partial(transport_path, density))(params_t, particles, residuals_t, jnp.asarray(3.0))
    np.testing.assert_allclose(path.base, z, rtol=1e-4, atol=1e-4)

    def path_elbo(params):
        terms = transport_objective(
            density, params, params_t, particles, scores, path, jax.random.PRNGKey(1),
            prox_weight=10.0, weighting="covariance",
        )[1]  # fmt: skip
        return terms["path_elbo"]

    def sticking_the_landing(params):
        u = density.transport.push(params, z)
        return -jnp.mean(log_p(u) - jax.vmap(density.log_prob, (None, 0))(params_t, u))

    ours = jax.jit(jax.grad(path_elbo))(params_t)
    expected = jax.jit(jax.grad(sticking_the_landing))(params_t)
    for mine, theirs in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-5)

    # Without the Fisher term (mini-batch scores) the objective's gradient at q_t is the
    # path term's weight times that gradient: the displacement's is zero there.
    def without_fisher(params):
        return transport_objective(
            density, params, params_t, particles, scores, path, jax.random.PRNGKey(1),
            prox_weight=10.0, weighting="covariance", fisher_weight=0.0,
        )  # fmt: skip

    assert "fisher" not in jax.jit(without_fisher)(params_t)[1]
    ours = jax.jit(jax.grad(lambda params: without_fisher(params)[0]))(params_t)
    for mine, theirs in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(mine, path.weight * theirs, rtol=1e-3, atol=1e-4)
