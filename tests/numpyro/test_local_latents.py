"""Local latents in subsampled plates (one latent per data point), NumPyro: AutoNormal
supports them as under SVI.

The guide keeps one loc/scale per plate member over the plate's full size; each step
the model sees the members of its mini-batch. A mini-batch member's own score comes
out of the plate-scaled log joint ``N/B`` times too large and is divided by it; its
residual then counts ``N/B`` times in the Fisher term, members outside the batch not
at all, so the objective's gradient stays unbiased for the full-data one."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import optax
import pytest
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import constraints as constraints_np
from numpyro.infer.autoguide import AutoNormal as NAutoNormal
from psvi_testing.hierarchical import B, N, exact_posterior, hierarchical_data

import numpyro_psvi


def numpyro_hierarchical(y, w, subsample_size=B, subsample=None):
    mu = numpyro.sample("mu", ndist.Normal(0.0, 10.0))
    with numpyro.plate("data", N, subsample_size=subsample_size):
        z = numpyro.sample("z", ndist.Normal(0.0, 1.0))
        numpyro.sample("s", ndist.LogNormal(0.5, 0.5))
        numpyro.sample("y", ndist.Normal(z, 1.0), obs=numpyro.subsample(y, event_dim=0))
        numpyro.sample("w", ndist.Normal(mu, 1.0), obs=numpyro.subsample(w, event_dim=0))


@pytest.mark.slow  # 17-42 s on the 2-core CI machine: the default suite keeps its budget
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


@pytest.mark.slow  # 13-25 s on the 2-core CI machine, a Pyro twin or sibling in the default suite
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
    """As the Pyro test (same target, tolerances and reasoning; the raw iterates, whose
    batch means the standard error is about, not their average)."""
    guide = NAutoNormal(numpyro_hierarchical)
    assert_fits_local_latents_exactly(guide, lambda kind, site: f"{site}_auto_{kind}")


def assert_fits_local_latents_exactly(guide, param_name) -> None:
    """The fit and assertions of :func:`test_numpyro_fits_local_latents_exactly` for
    ``guide``; ``param_name(kind, site)`` is the name of a site's ``"loc"`` or
    ``"scale"`` param."""
    y, w = map(jnp.asarray, hierarchical_data())
    svi = numpyro_psvi.ProximalScoreVI(numpyro_hierarchical, guide, optax.adam(0.05), average_iterates=False)
    result = svi.run(jax.random.PRNGKey(0), 600, y, w, progress_bar=False)

    def step(state, _):
        state, _ = svi.update(state, y, w)
        return state, svi.get_params(state)[param_name("loc", "mu")]

    state, mus = jax.lax.scan(step, result.state, None, length=400)
    assert int(state.num_rejected) == 0
    params = svi.get_params(state)
    exact = exact_posterior(np.asarray(y), np.asarray(w))
    for name in ("z", "s"):
        loc, sd = (np.asarray(v) for v in exact[name])
        assert np.max(np.abs(params[param_name("loc", name)] - loc) / sd) < 0.1
        np.testing.assert_allclose(params[param_name("scale", name)], sd, rtol=0.05)
    mus = np.asarray(mus)
    batch_means = mus.reshape(8, 50).mean(1)
    standard_error = batch_means.std(ddof=1) / np.sqrt(8)
    assert abs(np.mean(mus) - float(exact["mu"][0])) < 4 * standard_error


@pytest.mark.parametrize("lr", [1e-2, 1e-3])
def test_numpyro_defaults_fit_local_latents_with_the_users_adam(lr):
    """The defaults (averaged guide, reshuffled batches) after 3,000 updates with
    Adam(1e-2) or Adam(1e-3): means within 0.2 posterior sd, sds within 20%.

    Why these bounds: the locals' own scores are exact (independent blocks), so they
    carry no batch noise, only the start's transient (measured 0.04-0.13 sd at Adam(1e-3),
    0.001 at 1e-2; their sds within 2%). The global ``mu`` carries ~sqrt(N/B) = 2 sds of
    batch noise per update, and the average of the ~930 updates the ``i^5`` weights
    keep (``n (2p + 1) / (p + 1)^2``) leaves ~0.07 sd even with independent batches
    (measured 0.000-0.037 with ``i^3``): 0.2 is nearly 3 standard errors, while a wrong
    N/B factor moves sds by 50% (see :func:`test_numpyro_fits_local_latents_exactly`).
    """
    y, w = map(jnp.asarray, hierarchical_data())
    svi = numpyro_psvi.ProximalScoreVI(
        numpyro_hierarchical, NAutoNormal(numpyro_hierarchical), numpyro.optim.Adam(lr)
    )
    result = svi.run(jax.random.PRNGKey(0), 3000, y, w, progress_bar=False)
    assert int(result.state.num_rejected) == 0
    exact = exact_posterior(np.asarray(y), np.asarray(w))
    for name in ("mu", "z", "s"):
        loc, sd = (np.asarray(v) for v in exact[name])
        assert np.max(np.abs(np.asarray(result.params[f"{name}_auto_loc"]) - loc) / sd) < 0.2
        np.testing.assert_allclose(result.params[f"{name}_auto_scale"], sd, rtol=0.2)


@pytest.mark.slow  # 17-42 s on the 2-core CI machine: the default suite keeps its budget
def test_numpyro_inference_data_covers_local_latents_over_the_full_data():
    from numpyro_psvi.arviz import to_inference_data

    y, w = map(jnp.asarray, hierarchical_data())
    guide = NAutoNormal(numpyro_hierarchical)
    svi = numpyro_psvi.ProximalScoreVI(numpyro_hierarchical, guide, optax.adam(0.05))
    result = svi.run(jax.random.PRNGKey(0), 5, y, w, progress_bar=False)
    idata = to_inference_data(numpyro_hierarchical, guide, result.params, y, w, num_samples=8, num_chains=2)
    z = idata.posterior["z"].values
    assert z.shape == (2, 4, N)
    expected = ndist.Normal(z, 1.0).log_prob(np.asarray(y))
    np.testing.assert_allclose(idata.log_likelihood["y"].values, expected, rtol=1e-5)


# As the Pyro tests: a user-written guide whose params span the plate's full size and
# which indexes them by its plate's indices (the TBIP notebook's pattern).
def coupled_model(y, w, subsample_size=None):
    mu = numpyro.sample("mu", ndist.Normal(0.0, 10.0))
    with numpyro.plate("data", len(y), subsample_size=subsample_size):
        z = numpyro.sample("z", ndist.Normal(mu, 1.0))
        numpyro.sample("s", ndist.LogNormal(0.5, 0.5))
        numpyro.sample("y", ndist.Normal(z, 1.0), obs=numpyro.subsample(y, event_dim=0))
        numpyro.sample("w", ndist.Normal(mu, 1.0), obs=numpyro.subsample(w, event_dim=0))


def indexing_guide(y, w, subsample_size=None):
    n = len(y)
    positive = constraints_np.positive
    mu_loc = numpyro.param("mu_loc", 0.3)
    mu_scale = numpyro.param("mu_scale", 0.7, constraint=positive)
    z_loc = numpyro.param("z_loc", jnp.linspace(-1.0, 1.0, n))
    z_scale = numpyro.param("z_scale", jnp.linspace(0.5, 1.5, n), constraint=positive)
    s_loc = numpyro.param("s_loc", jnp.linspace(0.0, 0.5, n))
    s_scale = numpyro.param("s_scale", jnp.linspace(0.2, 0.8, n), constraint=positive)
    numpyro.sample("mu", ndist.Normal(mu_loc, mu_scale))
    with numpyro.plate("data", n, subsample_size=subsample_size) as idx:
        numpyro.sample("z", ndist.Normal(z_loc[idx], z_scale[idx]))
        numpyro.sample("s", ndist.LogNormal(s_loc[idx], s_scale[idx]))


def indexing_fit(n: int, b: int, model=coupled_model):
    """The engine, initialised on the indexing guide with batches of ``b`` of ``n``."""
    y, w = jax.random.normal(jax.random.PRNGKey(1), (2, n))
    svi = numpyro_psvi.ProximalScoreVI(
        model, indexing_guide, optax.adam(0.05), subsample_size=b, average_iterates=False
    )
    return svi, svi.init(jax.random.PRNGKey(0), y, w), (y, w)


@pytest.mark.slow  # 13-25 s on the 2-core CI machine, a Pyro twin or sibling in the default suite
def test_numpyro_user_guide_with_local_latents_has_the_mean_field_density_on_the_batch():
    """As the Pyro test of the same name."""
    n, batch = 6, jnp.array([4, 1])
    svi, state, _ = indexing_fit(n, 2)
    density = svi.density.at_indices({"data": batch})
    assert density.latent_dim == 1 + 2 * n
    params = svi.get_params(state)
    u = jax.random.normal(jax.random.PRNGKey(2), (3, 1 + 2 * n))
    mu, s, z = u[:, 0], u[:, 1 : 1 + n], u[:, 1 + n :]  # the flat layout's (sorted) order
    log_mu = ndist.Normal(params["mu_loc"], params["mu_scale"]).log_prob(mu)
    log_z = ndist.Normal(params["z_loc"], params["z_scale"]).log_prob(z)[:, batch].sum(-1)
    log_s = ndist.Normal(params["s_loc"], params["s_scale"]).log_prob(s)[:, batch].sum(-1)
    log_prob = jax.vmap(density.log_prob, (None, 0))(params, u)
    np.testing.assert_allclose(log_prob, log_mu + log_z + log_s, rtol=1e-5)
    elbo_log_prob = jax.vmap(density.elbo_log_prob, (None, 0, None))(params, u, None)  # no weights needed
    np.testing.assert_allclose(elbo_log_prob, log_mu + n / 2 * (log_z + log_s), rtol=1e-5)
    draws = density.sample(params, jax.random.PRNGKey(3), 5)
    outside = jnp.array([i for i in range(n) if i not in (1, 4)])
    assert (draws[:, 1 + outside] == 0).all() and (draws[:, 1 + n + outside] == 0).all()
    assert (draws[:, 1 + batch] != 0).all() and (draws[:, 1 + n + batch] != 0).all()
    with pytest.raises(NotImplementedError, match="'z' of this user-written guide is local"):
        svi.density.sample(params, jax.random.PRNGKey(3), 5)  # no batch: refused by name


@pytest.mark.slow  # 13-25 s on the 2-core CI machine, a Pyro twin or sibling in the default suite
def test_numpyro_user_guide_minibatch_fisher_gradient_is_unbiased_with_local_latents():
    """As the Pyro test of the same name (the full data: the batch of all 6 members)."""
    from numpyro_psvi.objective import weighted_fisher
    from numpyro_psvi.scores import coordinate_weights, make_score_fn

    n, b = 6, 2
    svi, state, (y, w) = indexing_fit(n, b)
    unconstrained_t = svi.optim.get_params(state.optim_state)
    params_t = svi.constrain_fn(unconstrained_t)
    particles = jax.random.normal(jax.random.PRNGKey(2), (3, svi.density.latent_dim))
    moved = jax.tree.map(lambda v: 1.3 * v + 0.2, unconstrained_t)
    local_plates = svi.density.local_plates
    shapes = {k: v.shape for k, v in svi.density.unpack(particles[0]).items()}
    score_fn = make_score_fn(coupled_model, svi.density.unpack, (y, w), {"subsample_size": b}, local_plates)

    def grad_for(indices):
        density = svi.density.at_indices(indices)
        _, scores = score_fn(particles, jax.random.PRNGKey(3), indices)
        weights, _ = coordinate_weights(local_plates, shapes, indices)
        if weights is not None:
            scores = scores / jnp.where(weights > 0, weights, 1.0)

        def fisher(unconstrained):
            params = svi.constrain_fn(unconstrained)
            return weighted_fisher(density, params, params_t, particles, scores, "identity", weights)

        return ravel_pytree(jax.grad(fisher)(moved))[0]

    full = grad_for({"data": jnp.arange(n)})
    batches = [{"data": jnp.array(c)} for c in itertools.combinations(range(n), b)]
    mean = jnp.mean(jnp.stack([grad_for(idx) for idx in batches]), axis=0)
    np.testing.assert_allclose(mean, full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 17-42 s on the 2-core CI machine: the default suite keeps its budget
def test_numpyro_user_guide_update_moves_only_what_its_batch_reads():
    """As the Pyro test of the same name: each update's guide and model share one batch,
    only its members' params move, and the second (disjoint, from the same epoch's
    permutation) leaves the first batch's members where the first put them; a
    ``numpyro.param`` of the model (``shift``) is learned as ever, not held."""

    def model_with_param(y, w, subsample_size=None):
        shift = numpyro.param("shift", 0.0)
        coupled_model(y + shift, w, subsample_size)

    n = 8
    svi, state, (y, w) = indexing_fit(n, 3, model_with_param)
    update = jax.jit(svi.update)
    batches = []
    for _ in range(2):
        before = svi.get_params(state)
        state, loss = update(state, y, w)
        assert np.isfinite(float(loss)) and int(state.num_rejected) == 0
        after = svi.get_params(state)
        moved = {name: np.asarray(after[name] != before[name]) for name in ("z_loc", "s_loc")}
        batch = np.flatnonzero(moved["z_loc"])
        assert len(batch) == 3
        np.testing.assert_array_equal(np.flatnonzero(moved["s_loc"]), batch)
        assert float(after["mu_loc"]) != float(before["mu_loc"])
        assert float(after["shift"]) != float(before["shift"])
        batches.append(set(batch.tolist()))
    assert not batches[0] & batches[1]


@pytest.mark.slow
def test_numpyro_user_guide_fits_local_latents_exactly():
    """~30 s here (slow, as its Pyro twin; the mechanism it rests on is tested by default:
    ``test_numpyro_user_guide_update_moves_only_what_its_batch_reads`` and the exact
    density and gradient tests). As :func:`test_numpyro_fits_local_latents_exactly`, for
    the indexing guide (the
    same mean-field family, written by hand): same target, tolerances and reasoning for
    the locals and for ``mu``'s mean (measured: 0.04 / 0.06 sd, sds within 3%). Without
    the engine holding the params a batch does not read, Adam's momentum leaves the
    locals 0.4-0.8 sd off (docs/guides.md). ``mu``'s sd is not asserted: this guide goes
    through the generic objective, whose mini-batch sd bias on a global is issue 19's
    open item (0.77 of the exact here; AutoNormal's split objective is exact)."""
    guide = functools.partial(indexing_guide, subsample_size=B)
    assert_fits_local_latents_exactly(guide, lambda kind, site: f"{site}_{kind}")


@pytest.mark.slow
def test_numpyro_autodiff_scores_with_local_latents_report_the_same_loss():
    """As the Pyro test of the same name (~12 s here, compile-bound; the Pyro twin runs
    by default)."""
    from numpyro_psvi.guides import guide_density
    from numpyro_psvi.objective import negative_elbo
    from numpyro_psvi.scores import coordinate_weights, make_score_fn

    y, w = map(jnp.asarray, hierarchical_data())
    guide = NAutoNormal(numpyro_hierarchical)
    svi = numpyro_psvi.ProximalScoreVI(numpyro_hierarchical, guide, optax.adam(0.05), score_method="autodiff")
    result = svi.run(jax.random.PRNGKey(0), 3, y, w, progress_bar=False)
    assert np.isfinite(np.asarray(result.losses)).all()
    closed, autodiff = guide_density(guide), guide_density(guide, score_method="autodiff")
    params = result.params
    particles = closed.sample(params, jax.random.PRNGKey(1), 4)
    indices = {"data": jnp.arange(B)}
    log_joints, _ = make_score_fn(numpyro_hierarchical, closed.unpack, (y, w), {}, closed.local_plates)(
        particles, jax.random.PRNGKey(2), indices
    )
    shapes = {k: v.shape for k, v in closed.unpack(particles[0]).items()}
    weights, _ = coordinate_weights(closed.local_plates, shapes, indices)
    losses = [
        negative_elbo(density, params, particles, log_joints, weights) for density in (closed, autodiff)
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
