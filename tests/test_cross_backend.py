"""The same model in Pyro and NumPyro: posterior means and sds agree (Monte Carlo tolerance)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyro
import torch
from numpyro.infer.autoguide import AutoMultivariateNormal as NumPyroMVN
from numpyro.infer.initialization import init_to_value as numpyro_init_to_value
from pyro.infer.autoguide import AutoMultivariateNormal as PyroMVN
from pyro.infer.autoguide import init_to_value as pyro_init_to_value

import numpyro_psvi
import numpyro_psvi.models
import pyro_psvi
import pyro_psvi.models
from psvi.targets import conjugate_linear_regression

STEPS = 1500
INNER = 20  # the default inner_steps of both engines
LR0, DECAY = 3e-3, 1000.0  # lr = LR0 / (1 + t / DECAY), t counting optimizer steps


def regression_data(n=400, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=n)).astype(np.float32)
    return x, y


def numpyro_fits(x, y, num_fits):
    model = partial(numpyro_psvi.models.linear_regression, subsample_size=40)
    guide = NumPyroMVN(model, init_loc_fn=numpyro_init_to_value(values={"w": jnp.zeros(3)}))
    svi = numpyro_psvi.ProximalScoreVI(model, guide, optax.adam(lambda t: LR0 / (1 + t / DECAY)))
    x, y = jnp.asarray(x), jnp.asarray(y)
    svi.init(jax.random.PRNGKey(0), x, y)

    def fit(key):
        state = svi.init(key, x, y)
        state, _ = jax.lax.scan(lambda s, _: svi.update(s, x, y), state, None, length=STEPS)
        params = svi.get_params(state)
        tril = params["auto_scale_tril"]
        return params["auto_loc"], jnp.sqrt(jnp.diag(tril @ tril.T))

    keys = jax.random.split(jax.random.PRNGKey(1), num_fits)
    locs, sds = jax.jit(jax.vmap(fit))(keys)
    return np.asarray(locs, np.float64), np.asarray(sds, np.float64)


def pyro_fit(x, y):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = partial(pyro_psvi.models.linear_regression, subsample_size=40)
    guide = PyroMVN(model, init_loc_fn=pyro_init_to_value(values={"w": torch.zeros(3)}))
    # The same schedule as NumPyro's: the scheduler steps once per update of INNER steps.
    scheduler = pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": LR0},
         "lr_lambda": lambda update: 1.0 / (1.0 + update * INNER / DECAY)}
    )  # fmt: skip
    svi = pyro_psvi.ProximalScoreVI(model, guide, scheduler)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(STEPS):
        svi.step(x, y)
        scheduler.step()
    posterior = guide.get_posterior()
    loc = posterior.loc.detach().double().numpy()
    sd = posterior.covariance_matrix.detach().double().diagonal().sqrt().numpy()
    return loc, sd


def test_pyro_and_numpyro_agree_on_subsampled_regression():
    torch.set_num_threads(1)
    x, y = regression_data()
    exact_mean, exact_cov = conjugate_linear_regression(x, y, prior_scale=1.0, noise_scale=1.0)
    exact_sd = np.sqrt(np.diag(exact_cov))
    num_fits = 16
    np_locs, np_sds = numpyro_fits(x, y, num_fits)
    pyro_loc, pyro_sd = pyro_fit(x, y)
    # NumPyro's independent fits give the spread of one fit. A Pyro fit is one more
    # draw from (nearly) the same distribution, so it lies within 5 spreads of their
    # average (spread * sqrt(1 + 1/16)); 6 numbers, chance failure < 4e-6 if Gaussian.
    band = 5 * np.sqrt(1 + 1 / num_fits)
    assert np.all(np.abs(pyro_loc - np_locs.mean(0)) < band * np_locs.std(0, ddof=1))
    assert np.all(np.abs(pyro_sd - np_sds.mean(0)) < band * np_sds.std(0, ddof=1))
    # Both are near the exact posterior (its sd is ~0.05): the fits are informative.
    assert np.all(np.abs(np_locs.mean(0) - exact_mean) < 0.2 * exact_sd)
    assert np.all(np.abs(pyro_loc - exact_mean) < 0.5 * exact_sd)
    np.testing.assert_allclose(pyro_sd, exact_sd, rtol=0.2)
    assert np.all(np_locs.std(0) < 0.5 * exact_sd)
