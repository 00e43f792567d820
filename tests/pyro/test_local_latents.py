"""Local latents in subsampled plates (one latent per data point), Pyro: AutoNormal
supports them as under SVI.

The guide keeps one loc/scale per plate member over the plate's full size; each step
the model sees the members of its mini-batch. A mini-batch member's own score comes
out of the plate-scaled log joint ``N/B`` times too large and is divided by it; its
residual then counts ``N/B`` times in the Fisher term, members outside the batch not
at all, so the objective's gradient stays unbiased for the full-data one."""

import functools
import itertools

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from psvi_testing.hierarchical import B, N, exact_posterior, hierarchical_data
from pyro.infer.autoguide import AutoNormal
from torch.distributions import constraints

from pyro_psvi import ProximalScoreVI
from pyro_psvi.objective import proximal_objective
from pyro_psvi.scores import model_scores


def pyro_hierarchical(y, w, subsample_size=B, subsample=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", N, subsample_size=subsample_size, subsample=subsample):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("s", dist.LogNormal(0.5, 0.5))
        pyro.sample("y", dist.Normal(z, 1.0), obs=pyro.subsample(y, event_dim=0))
        pyro.sample("w", dist.Normal(mu, 1.0), obs=pyro.subsample(w, event_dim=0))


def test_pyro_smoke_pattern_param_and_local_latent_in_subsampled_plate():
    """Pyro's own ``test_subsample_model`` (tests/infer/test_autoguide.py) with
    ProximalScoreVI in place of SVI(..., Trace_ELBO())."""

    def model(x, y=None, batch_size=None):
        loc = pyro.param("loc", lambda: torch.tensor(0.0))
        scale = pyro.param("scale", lambda: torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("batch", len(x), subsample_size=batch_size):
            batch_x = pyro.subsample(x, event_dim=0)
            batch_y = pyro.subsample(y, event_dim=0) if y is not None else None
            mean = loc + scale * batch_x
            sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
            return pyro.sample("obs", dist.Normal(mean, sigma), obs=batch_y)

    pyro.clear_param_store()  # Pyro's own suite does this in a fixture: "loc" must be new
    guide = AutoNormal(model)
    full_size, batch_size = 50, 20
    pyro.set_rng_seed(123456789)
    x = torch.randn(full_size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape

    pyro.get_param_store().clear()
    pyro.set_rng_seed(123456789)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 0.02}))
    losses = [svi.step(x, y, batch_size=batch_size) for _ in range(5)]
    assert np.all(np.isfinite(losses)) and svi.num_rejected == 0
    store = pyro.get_param_store()
    assert store["AutoNormal.locs.sigma"].shape == (full_size,)
    assert store["loc"].item() != 0.0 and store["scale"].item() != 1.0  # learned (EM)
    assert all(torch.isfinite(store[name]).all() for name in store.keys())


def test_pyro_minibatch_gradient_is_unbiased_with_local_latents():
    """At fixed particles, the mean of grad L_t over ALL mini-batches of size 2 of 6
    data points equals the full-data grad L_t (exact enumeration, no sampling)."""
    n, b = 6, 2
    y, w = torch.randn(n), torch.randn(n)

    def model(subsample=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", n, subsample=subsample):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("s", dist.LogNormal(0.5, 0.5))
            pyro.sample("y", dist.Normal(z, 1.0), obs=pyro.subsample(y, event_dim=0))
            pyro.sample("w", dist.Normal(mu, 1.0), obs=pyro.subsample(w, event_dim=0))

    pyro.clear_param_store()
    svi = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}))
    svi.evaluate_loss()  # sets up the guide and its density
    density = svi.density
    params_t = {k: pyro.param(k).detach() for k in density.param_names}
    particles = density.sample(params_t, 3)
    leaves = {k: (v * 1.3 + 0.2).requires_grad_(True) for k, v in params_t.items()}

    def grad_for(subsample):
        scored = model_scores(
            model, density, particles, (), {"subsample": subsample}, max_plate_nesting=1,
            vectorize=True,
        )  # fmt: skip
        loss, _ = proximal_objective(
            density, leaves, params_t, particles, scored.scores, prox_weight=1.0,
            weighting="covariance", weights=scored.weights,
        )  # fmt: skip
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(leaves.values()))])

    full = grad_for(None)
    batches = [torch.tensor(c) for c in itertools.combinations(range(n), b)]
    mean = torch.stack([grad_for(idx) for idx in batches]).mean(0)
    torch.testing.assert_close(mean, full, rtol=1e-4, atol=1e-4)


def test_pyro_fits_local_latents_exactly():
    """Mean-field-exact hierarchical target with N/B = 4.

    Tolerances: a local loc within 0.1 posterior sd and sd within 5% (they are fitted
    from exact scores; the fit reaches 0.04 sd and 1.5%). Getting the N/B factor wrong
    fails both by far: undivided local scores give sds sqrt(B/N) = 0.5 of exact, and an
    unscaled log-Jacobian shifts log s by (1 - B/N) * 0.25 = 0.19 = 0.375 sd. The global
    mu sees mini-batch score noise, so its iterates jitter (~0.4 posterior sd here):
    their average over 400 steps must sit within 4 batch-means standard errors.
    """
    pyro.clear_param_store()
    assert_fits_local_latents_exactly(
        AutoNormal(pyro_hierarchical), lambda kind, site: f"AutoNormal.{kind}s.{site}"
    )


def assert_fits_local_latents_exactly(guide, param_name) -> None:
    """The fit and assertions of :func:`test_pyro_fits_local_latents_exactly` for
    ``guide``; ``param_name(kind, site)`` is the param-store name of a site's ``"loc"``
    or ``"scale"``."""
    y, w = map(torch.as_tensor, hierarchical_data())
    pyro.set_rng_seed(0)
    # The raw iterates (not their average, which the store holds by default): their
    # batch means are what the standard error below is about.
    svi = ProximalScoreVI(pyro_hierarchical, guide, pyro.optim.Adam({"lr": 0.05}), average_iterates=False)
    svi.run(600, y, w)
    mus = []
    for _ in range(400):
        svi.step(y, w)
        mus.append(pyro.param(param_name("loc", "mu")).item())
    assert svi.num_rejected == 0
    exact = exact_posterior(y.numpy(), w.numpy())
    for name in ("z", "s"):
        loc, sd = (torch.as_tensor(v, dtype=torch.float32) for v in exact[name])
        fitted_loc = pyro.param(param_name("loc", name)).detach()
        fitted_sd = pyro.param(param_name("scale", name)).detach()
        assert ((fitted_loc - loc).abs() / sd).max() < 0.1
        torch.testing.assert_close(fitted_sd, sd, rtol=0.05, atol=0.0)
    batch_means = np.asarray(mus).reshape(8, 50).mean(1)
    standard_error = batch_means.std(ddof=1) / np.sqrt(8)
    assert abs(np.mean(mus) - float(exact["mu"][0])) < 4 * standard_error


@pytest.mark.slow
@pytest.mark.parametrize("lr", [1e-2, 1e-3])
def test_pyro_defaults_fit_local_latents_with_the_users_adam(lr):
    """As NumPyro's test of the same name (bounds derived there)."""
    y, w = map(torch.as_tensor, hierarchical_data())
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = ProximalScoreVI(pyro_hierarchical, AutoNormal(pyro_hierarchical), pyro.optim.Adam({"lr": lr}))
    svi.run(3000, y, w)
    assert svi.num_rejected == 0
    store = pyro.get_param_store()
    exact = exact_posterior(y.numpy(), w.numpy())
    for name in ("mu", "z", "s"):
        loc, sd = (np.asarray(v, np.float64) for v in exact[name])
        fitted_loc = store[f"AutoNormal.locs.{name}"].detach().double().numpy()
        fitted_sd = store[f"AutoNormal.scales.{name}"].detach().double().numpy()
        assert np.max(np.abs(fitted_loc - loc) / sd) < 0.2
        np.testing.assert_allclose(fitted_sd, sd, rtol=0.2)


def test_pyro_inference_data_covers_local_latents_over_the_full_data():
    """Posterior draws of z span all N members; the pointwise log-likelihoods of each
    draw are N(y_i | z_i, 1) and N(w_i | mu, 1) over the full data, chunk by chunk, with
    all draws in one model pass per block of the plate (two passes of draws: 32 and 8)."""
    from pyro_psvi.arviz import to_inference_data

    y, w = map(torch.as_tensor, hierarchical_data())
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(pyro_hierarchical)
    ProximalScoreVI(pyro_hierarchical, guide, pyro.optim.Adam({"lr": 0.05})).run(5, y, w)
    calls = []

    def counted(*args, **kwargs):
        calls.append(None)
        return pyro_hierarchical(*args, **kwargs)

    idata = to_inference_data(counted, guide, y, w, num_samples=40, num_chains=2, diagnostics=False)
    z, mu = (torch.as_tensor(idata.posterior[name].values) for name in ("z", "mu"))
    assert z.shape == (2, 20, N) and idata.posterior_predictive["y"].shape == (2, 20, N)
    np.testing.assert_allclose(idata.log_likelihood["y"].values, dist.Normal(z, 1.0).log_prob(y), rtol=1e-5)
    expected_w = dist.Normal(mu[..., None], 1.0).log_prob(w)
    np.testing.assert_allclose(idata.log_likelihood["w"].values, expected_w, rtol=1e-5)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    # Two traces, then block by block of the plate: the first draw's two passes (the
    # sites' shapes), the probe (four draws at once, then the other three one at a time,
    # two passes each), two passes per block of draws, and one for the observed values.
    # One draw at a time would take 2 + 81 blocks.
    blocks = -(-N // B)
    assert len(calls) == 2 + (2 + 2 + 6 + 2 * 2 + 1) * blocks


def test_pyro_diagnostics_log_joints_take_all_draws_at_once_over_the_full_data():
    """The diagnostics' full-data log joints and scores (``vi_diagnostics``,
    ``mode_coverage``) equal the closed form, with all draws in one model pass per block
    of the plate once the probe has found the model broadcast-safe."""
    from pyro_psvi import arviz as parviz

    y, w = map(torch.as_tensor, hierarchical_data())
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(pyro_hierarchical, init_scale=1.0)
    guide(y, w)
    calls = []

    def counted(*args, **kwargs):
        calls.append(None)
        return pyro_hierarchical(*args, **kwargs)

    density, params = parviz._density(counted, guide, (y, w), {})
    draws = density.sample(params, 8).requires_grad_(True)
    calls.clear()
    log_joints, scores = parviz._full_data_log_joints(counted, density, (y, w), {})(draws.detach())
    # In the unconstrained space: mu, z and log s, whose LogNormal is N(0.5, 0.5).
    values = density.unpack(draws)
    mu, z, log_s = values["mu"], values["z"], values["s"]
    expected = (
        dist.Normal(0.0, 10.0).log_prob(mu)
        + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(0.5, 0.5).log_prob(log_s).sum(-1)
        + dist.Normal(z, 1.0).log_prob(y).sum(-1)
        + dist.Normal(mu[:, None], 1.0).log_prob(w).sum(-1)
    )
    torch.testing.assert_close(log_joints, expected.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(scores, torch.autograd.grad(expected.sum(), draws)[0], rtol=1e-4, atol=1e-4)
    # A trace for the plate, the probe (four draws at once, then one at a time) and the
    # eight draws at once, each block by block: one at a time would take 1 + 13 blocks.
    blocks = -(-N // B)
    assert len(calls) == 1 + 6 * blocks


# A user-written guide whose params span the plate's full size and which indexes them by
# its plate's indices (the TBIP notebook's pattern): the same mean-field family as
# AutoNormal, so the same exact quantities hold.
def coupled_model(y, w, subsample=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y), subsample=subsample):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("s", dist.LogNormal(0.5, 0.5))
        pyro.sample("y", dist.Normal(z, 1.0), obs=pyro.subsample(y, event_dim=0))
        pyro.sample("w", dist.Normal(mu, 1.0), obs=pyro.subsample(w, event_dim=0))


def indexing_guide(y, w, subsample=None, subsample_size=None):
    n = len(y)
    mu_loc = pyro.param("mu_loc", torch.tensor(0.3))
    mu_scale = pyro.param("mu_scale", torch.tensor(0.7), constraint=constraints.positive)
    z_loc = pyro.param("z_loc", torch.linspace(-1.0, 1.0, n))
    z_scale = pyro.param("z_scale", torch.linspace(0.5, 1.5, n), constraint=constraints.positive)
    s_loc = pyro.param("s_loc", torch.linspace(0.0, 0.5, n))
    s_scale = pyro.param("s_scale", torch.linspace(0.2, 0.8, n), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    with pyro.plate("data", n, subsample_size=subsample_size, subsample=subsample) as idx:
        pyro.sample("z", dist.Normal(z_loc[idx], z_scale[idx]))
        pyro.sample("s", dist.LogNormal(s_loc[idx], s_scale[idx]))


def user_density(y, w, subsample):
    """The indexing guide's density on the mini-batch ``subsample`` (None: full data)."""
    from pyro import poutine

    from pyro_psvi.guides import user_guide_density, user_guide_layout

    model_trace = poutine.trace(coupled_model).get_trace(y, w, subsample)
    guide_trace = poutine.trace(indexing_guide).get_trace(y, w, subsample)
    layout = user_guide_layout(indexing_guide, model_trace, guide_trace)
    density = user_guide_density(indexing_guide, layout, (y, w), {"subsample": subsample}, 1)
    if subsample is not None:
        density.plate_indices["data"] = subsample
    return density


def test_pyro_user_guide_with_local_latents_has_the_mean_field_density_on_the_batch():
    """On a mini-batch the density is that of the global and the batch's members, in
    closed form here: N(mu) + sum over the batch of N(z_i) + N(log s_i) (unconstrained),
    with no N/B; the ELBO's ``log q`` counts the members N/B times, as Trace_ELBO's guide
    plate does. A draw fills the batch's members of the full-size latent, 0 elsewhere."""
    n, batch = 6, torch.tensor([4, 1])
    y, w = torch.randn(n), torch.randn(n)
    pyro.clear_param_store()
    density = user_density(y, w, batch)
    assert density.latent_dim == 1 + 2 * n
    params = {name: pyro.param(name).detach() for name in density.param_names}
    u = torch.randn(3, 1 + 2 * n)
    mu, z, s = u[:, 0], u[:, 1 : 1 + n], u[:, 1 + n :]
    log_mu = dist.Normal(params["mu_loc"], params["mu_scale"]).log_prob(mu)
    log_z = dist.Normal(params["z_loc"], params["z_scale"]).log_prob(z)[:, batch].sum(-1)
    log_s = dist.Normal(params["s_loc"], params["s_scale"]).log_prob(s)[:, batch].sum(-1)
    torch.testing.assert_close(density.log_prob(params, u), log_mu + log_z + log_s)
    elbo_log_prob = density.elbo_log_prob(params, u, None)  # the guide knows its batch: no weights
    torch.testing.assert_close(elbo_log_prob, log_mu + n / 2 * (log_z + log_s))
    draws = density.sample(params, 5)
    outside = torch.tensor([i for i in range(n) if i not in batch.tolist()])
    assert (draws[:, 1 + outside] == 0).all() and (draws[:, 1 + n + outside] == 0).all()
    assert (draws[:, 1 + batch] != 0).all() and (draws[:, 1 + n + batch] != 0).all()


def test_pyro_user_guide_minibatch_fisher_gradient_is_unbiased_with_local_latents():
    """As the AutoNormal test above, for the indexing guide: at fixed full-size particles
    the mean over ALL mini-batches of 2 of 6 of the gradient of the weighted Fisher term
    (linear in the model scores, which are unbiased; identity weighting, whose weights
    are exact) equals the full-data one. A member's guide score carrying the plate's N/B,
    or a member's value read at another's position, fails it."""
    from pyro_psvi.objective import weighted_fisher

    n, b = 6, 2
    y, w = torch.randn(n), torch.randn(n)
    pyro.clear_param_store()
    full_density = user_density(y, w, None)
    params_t = {name: pyro.param(name).detach() for name in full_density.param_names}
    particles = torch.randn(3, full_density.latent_dim)
    leaves = {k: (v * 1.3 + 0.2).requires_grad_(True) for k, v in params_t.items()}

    def grad_for(subsample):
        density = full_density if subsample is None else user_density(y, w, subsample)
        scored = model_scores(
            coupled_model, density, particles, (y, w), {"subsample": subsample},
            max_plate_nesting=1, vectorize=True,
        )  # fmt: skip
        fisher = weighted_fisher(
            density, leaves, params_t, particles, scored.scores, "identity", scored.weights
        )
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(fisher, list(leaves.values()))])

    full = grad_for(None)
    batches = [torch.tensor(c) for c in itertools.combinations(range(n), b)]
    mean = torch.stack([grad_for(idx) for idx in batches]).mean(0)
    torch.testing.assert_close(mean, full, rtol=1e-4, atol=1e-4)


def test_pyro_user_guide_step_moves_only_what_its_batch_reads():
    """ProximalScoreVI takes a guide that indexes its params by its plate's indices (it
    was refused): each step's guide and model see one batch, and only that batch's
    members' params move. The second step's batch is disjoint from the first's (batches
    of 3 of 8 from one permutation): Adam's momentum from the first step would move the
    first batch's members again (zero gradient, non-zero moment), and the engine holds
    them (docs/guides.md)."""
    n = 8
    y, w = torch.randn(n), torch.randn(n)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    seen = {}

    def batched_model(y, w):
        shift = pyro.param("shift", torch.tensor(0.0))  # a model param: learned, not held
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", n, subsample_size=3) as idx:
            seen["model"] = idx
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("s", dist.LogNormal(0.5, 0.5))
            pyro.sample("y", dist.Normal(z + shift, 1.0), obs=y[idx])

    def batched_guide(y, w):
        z_loc = pyro.param("z_loc", torch.zeros(n))
        z_scale = pyro.param("z_scale", torch.ones(n), constraint=constraints.positive)
        s_loc = pyro.param("s_loc", torch.zeros(n))
        s_scale = pyro.param("s_scale", torch.ones(n), constraint=constraints.positive)
        mu_loc = pyro.param("mu_loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(mu_loc, 1.0))
        with pyro.plate("data", n, subsample_size=3) as idx:
            seen["guide"] = idx
            pyro.sample("z", dist.Normal(z_loc[idx], z_scale[idx]))
            pyro.sample("s", dist.LogNormal(s_loc[idx], s_scale[idx]))

    svi = ProximalScoreVI(batched_model, batched_guide, pyro.optim.Adam({"lr": 0.05}), average_iterates=False)
    svi.evaluate_loss(y, w)  # sets up (its own batch)
    for _ in range(2):
        before = {k: pyro.param(k).detach().clone() for k in ("z_loc", "s_loc", "mu_loc", "shift")}
        loss = svi.step(y, w)
        assert np.isfinite(loss) and svi.num_rejected == 0
        batch = seen["model"]
        torch.testing.assert_close(seen["guide"], batch)
        outside = torch.tensor([i for i in range(n) if i not in batch.tolist()])
        for name in ("z_loc", "s_loc"):
            moved = pyro.param(name).detach() != before[name]
            assert moved[batch].all() and not moved[outside].any()
        assert pyro.param("mu_loc").item() != before["mu_loc"].item()
        assert pyro.param("shift").item() != before["shift"].item()


@pytest.mark.slow
def test_pyro_user_guide_fits_local_latents_exactly():
    """As NumPyro's test of the same name (~160 s here: the guide runs in every inner
    step; both twins are slow, the mechanism is tested by default)."""
    pyro.clear_param_store()
    guide = functools.partial(indexing_guide, subsample_size=B)
    assert_fits_local_latents_exactly(guide, lambda kind, site: f"{site}_{kind}")


def test_pyro_inference_data_refuses_a_user_guide_with_local_latents():
    """Such a guide's density is one mini-batch's: a full-data export would hold zeros
    for every other member, so it is refused by name."""
    from pyro_psvi.arviz import to_inference_data

    y, w = torch.randn(6), torch.randn(6)
    pyro.clear_param_store()
    with pytest.raises(NotImplementedError, match="'z' of this user-written guide is local"):
        to_inference_data(coupled_model, indexing_guide, y, w, torch.tensor([0, 3]), num_samples=4)


def test_pyro_autodiff_scores_with_local_latents_report_the_same_loss():
    """AutoNormal with ``score_method="autodiff"`` (the generic path) and a subsampled
    plate of local latents: the step's -ELBO (here on the same particles and batch) is
    the closed-form guide's to float rounding (it was a TypeError: the weighted ``log q``
    read the closed form's ``loc_scale``), and steps run."""
    from pyro_psvi.guides import guide_density
    from pyro_psvi.objective import negative_elbo

    y, w = map(torch.as_tensor, hierarchical_data())
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(pyro_hierarchical)
    svi = ProximalScoreVI(pyro_hierarchical, guide, pyro.optim.Adam({"lr": 0.05}), score_method="autodiff")
    assert np.isfinite(svi.run(3, y, w)).all()
    closed, autodiff = guide_density(guide), guide_density(guide, score_method="autodiff")
    params = {name: pyro.param(name).detach() for name in closed.param_names}
    particles = closed.sample(params, 4)
    scored = model_scores(
        pyro_hierarchical, closed, particles, (y, w), {}, max_plate_nesting=1, vectorize=True
    )
    losses = [
        negative_elbo(density, params, particles, scored.log_joints, scored.weights)
        for density in (closed, autodiff)
    ]
    torch.testing.assert_close(losses[0], losses[1])
