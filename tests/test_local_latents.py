"""Local latents in subsampled plates (one latent per data point), as Pyro's AutoNormal
and NumPyro's AutoNormal support them under SVI.

The guide keeps one loc/scale per plate member over the plate's full size; each step
the model sees the members of its mini-batch. A mini-batch member's own score comes
out of the plate-scaled log joint ``N/B`` times too large and is divided by it; its
residual then counts ``N/B`` times in the Fisher term, members outside the batch not
at all, so the objective's gradient stays unbiased for the full-data one.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import optax
import pyro
import pyro.distributions as dist
import torch
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import constraints as constraints_np
from numpyro.infer.autoguide import AutoNormal as NAutoNormal
from pyro.infer.autoguide import AutoNormal
from torch.distributions import constraints

import numpyro_psvi
from pyro_psvi import ProximalScoreVI
from pyro_psvi.objective import proximal_objective
from pyro_psvi.scores import model_scores

N, B = 40, 10


def hierarchical_data():
    g = torch.Generator().manual_seed(0)
    return 2 * torch.randn(N, generator=g), 1.5 + torch.randn(N, generator=g)


def exact_posterior(y, w):
    """Independent blocks: z_i | y_i ~ N(y_i / 2, 1/2); log s_i ~ N(0.5, 0.5^2) (prior
    only, exact in unconstrained space with the log-Jacobian); mu | w ~ N(sum w / P, 1 / P)
    with P = N + 1/100."""
    precision = N + 0.01
    return {
        "z": (y / 2, torch.full((N,), 0.5**0.5)),
        "s": (torch.full((N,), 0.5), torch.full((N,), 0.5)),
        "mu": (w.sum() / precision, precision**-0.5),
    }


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
    y, w = hierarchical_data()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(pyro_hierarchical)
    svi = ProximalScoreVI(pyro_hierarchical, guide, pyro.optim.Adam({"lr": 0.05}))
    svi.run(600, y, w)
    store = pyro.get_param_store()
    mus = []
    for _ in range(400):
        svi.step(y, w)
        mus.append(store["AutoNormal.locs.mu"].item())
    assert svi.num_rejected == 0
    exact = exact_posterior(y, w)
    for name in ("z", "s"):
        loc, sd = exact[name]
        fitted_loc = store[f"AutoNormal.locs.{name}"].detach()
        fitted_sd = store[f"AutoNormal.scales.{name}"].detach()
        assert ((fitted_loc - loc).abs() / sd).max() < 0.1
        torch.testing.assert_close(fitted_sd, sd, rtol=0.05, atol=0.0)
    batch_means = np.asarray(mus).reshape(8, 50).mean(1)
    standard_error = batch_means.std(ddof=1) / np.sqrt(8)
    assert abs(np.mean(mus) - float(exact["mu"][0])) < 4 * standard_error


def test_pyro_inference_data_covers_local_latents_over_the_full_data():
    """Posterior draws of z span all N members; the pointwise log-likelihood of each
    draw is N(y_i | z_i, 1) over the full data, chunk by chunk."""
    from pyro_psvi.arviz import to_inference_data

    y, w = hierarchical_data()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(pyro_hierarchical)
    ProximalScoreVI(pyro_hierarchical, guide, pyro.optim.Adam({"lr": 0.05})).run(5, y, w)
    idata = to_inference_data(pyro_hierarchical, guide, y, w, num_samples=8, num_chains=2)
    z = torch.as_tensor(idata.posterior["z"].values)
    assert z.shape == (2, 4, N)
    expected = dist.Normal(z, 1.0).log_prob(y)
    np.testing.assert_allclose(idata.log_likelihood["y"].values, expected.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())


# ------------------------------------------------------------------------- NumPyro


def numpyro_hierarchical(y, w, subsample_size=B, subsample=None):
    mu = numpyro.sample("mu", ndist.Normal(0.0, 10.0))
    with numpyro.plate("data", N, subsample_size=subsample_size):
        z = numpyro.sample("z", ndist.Normal(0.0, 1.0))
        numpyro.sample("s", ndist.LogNormal(0.5, 0.5))
        numpyro.sample("y", ndist.Normal(z, 1.0), obs=numpyro.subsample(y, event_dim=0))
        numpyro.sample("w", ndist.Normal(mu, 1.0), obs=numpyro.subsample(w, event_dim=0))


def test_numpyro_smoke_pattern_param_and_local_latent_in_subsampled_plate():
    """Pyro's ``test_subsample_model`` pattern written in NumPyro."""

    def model(x, y=None, batch_size=None):
        loc = numpyro.param("loc", 0.0)
        scale = numpyro.param("scale", 1.0, constraint=constraints_np.positive)
        with numpyro.plate("batch", len(x), subsample_size=batch_size):
            batch_x = numpyro.subsample(x, event_dim=0)
            batch_y = numpyro.subsample(y, event_dim=0) if y is not None else None
            mean = loc + scale * batch_x
            sigma = numpyro.sample("sigma", ndist.LogNormal(0.0, 1.0))
            return numpyro.sample("obs", ndist.Normal(mean, sigma), obs=batch_y)

    x = jax.random.normal(jax.random.PRNGKey(1), (50,))
    y = handlers.seed(model, 2)(x)
    svi = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), optax.adam(0.02))
    result = svi.run(jax.random.PRNGKey(0), 5, x, y, batch_size=20, progress_bar=False)
    assert np.all(np.isfinite(result.losses)) and int(result.state.num_rejected) == 0
    assert result.params["sigma_auto_loc"].shape == (50,)
    assert result.params["loc"] != 0.0 and result.params["scale"] != 1.0


def test_numpyro_minibatch_gradient_is_unbiased_with_local_latents():
    """As the Pyro test: the mean over ALL mini-batches of 2 of 6 equals the full grad."""
    from numpyro_psvi.objective import proximal_objective as n_proximal_objective
    from numpyro_psvi.scores import coordinate_weights, make_score_fn

    n, b = 6, 2
    y, w = jax.random.normal(jax.random.PRNGKey(1), (2, n))

    def model():
        mu = numpyro.sample("mu", ndist.Normal(0.0, 10.0))
        with numpyro.plate("data", n, subsample_size=b):
            z = numpyro.sample("z", ndist.Normal(mu, 1.0))
            numpyro.sample("s", ndist.LogNormal(0.5, 0.5))
            numpyro.sample("y", ndist.Normal(z, 1.0), obs=numpyro.subsample(y, event_dim=0))
            numpyro.sample("w", ndist.Normal(mu, 1.0), obs=numpyro.subsample(w, event_dim=0))

    svi = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), optax.adam(1e-2))
    state = svi.init(jax.random.PRNGKey(0))
    density = svi.density
    unconstrained_t = svi.optim.get_params(state.optim_state)
    params_t = svi.constrain_fn(unconstrained_t)
    particles = density.sample(params_t, jax.random.PRNGKey(2), 3)
    moved = jax.tree.map(lambda v: 1.3 * v + 0.2, unconstrained_t)
    shapes = {k: v.shape for k, v in density.unpack(particles[0]).items()}
    score_fn = make_score_fn(model, density.unpack, (), {}, density.local_plates)

    def grad_for(indices):
        _, scores = score_fn(particles, jax.random.PRNGKey(3), indices)
        weights, _ = coordinate_weights(density.local_plates, shapes, indices)
        if weights is not None:
            scores = scores / jnp.where(weights > 0, weights, 1.0)

        def objective(unconstrained):
            value, _ = n_proximal_objective(
                density, svi.constrain_fn(unconstrained), params_t, particles, scores, None,
                prox_weight=1.0, weighting="covariance", weights=weights,
            )  # fmt: skip
            return value

        return ravel_pytree(jax.grad(objective)(moved))[0]

    full = grad_for({"data": jnp.arange(n)})
    batches = [{"data": jnp.array(c)} for c in itertools.combinations(range(n), b)]
    mean = jnp.mean(jnp.stack([grad_for(idx) for idx in batches]), axis=0)
    np.testing.assert_allclose(mean, full, rtol=1e-4, atol=1e-4)


def test_numpyro_fits_local_latents_exactly():
    """As the Pyro test (same target, tolerances and reasoning)."""
    y, w = (jnp.asarray(a.numpy()) for a in hierarchical_data())
    guide = NAutoNormal(numpyro_hierarchical)
    svi = numpyro_psvi.ProximalScoreVI(numpyro_hierarchical, guide, optax.adam(0.05))
    result = svi.run(jax.random.PRNGKey(0), 600, y, w, progress_bar=False)

    def step(state, _):
        state, _ = svi.update(state, y, w)
        return state, svi.get_params(state)["mu_auto_loc"]

    state, mus = jax.lax.scan(step, result.state, None, length=400)
    assert int(state.num_rejected) == 0
    params = svi.get_params(state)
    exact = exact_posterior(torch.tensor(np.asarray(y)), torch.tensor(np.asarray(w)))
    for name in ("z", "s"):
        loc, sd = (np.asarray(v) for v in exact[name])
        assert np.max(np.abs(params[f"{name}_auto_loc"] - loc) / sd) < 0.1
        np.testing.assert_allclose(params[f"{name}_auto_scale"], sd, rtol=0.05)
    mus = np.asarray(mus)
    batch_means = mus.reshape(8, 50).mean(1)
    standard_error = batch_means.std(ddof=1) / np.sqrt(8)
    assert abs(np.mean(mus) - float(exact["mu"][0])) < 4 * standard_error


def test_numpyro_inference_data_covers_local_latents_over_the_full_data():
    from numpyro_psvi.arviz import to_inference_data

    y, w = (jnp.asarray(a.numpy()) for a in hierarchical_data())
    guide = NAutoNormal(numpyro_hierarchical)
    svi = numpyro_psvi.ProximalScoreVI(numpyro_hierarchical, guide, optax.adam(0.05))
    result = svi.run(jax.random.PRNGKey(0), 5, y, w, progress_bar=False)
    idata = to_inference_data(numpyro_hierarchical, guide, result.params, y, w, num_samples=8, num_chains=2)
    z = idata.posterior["z"].values
    assert z.shape == (2, 4, N)
    expected = ndist.Normal(z, 1.0).log_prob(np.asarray(y))
    np.testing.assert_allclose(idata.log_likelihood["y"].values, expected, rtol=1e-5)
