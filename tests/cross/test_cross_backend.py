"""The same model in Pyro and NumPyro: posterior means and sds agree (Monte Carlo tolerance)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyro
import pytest
import torch
from numpyro.infer.autoguide import AutoMultivariateNormal as NumPyroMVN
from numpyro.infer.initialization import init_to_value as numpyro_init_to_value
from pyro.infer.autoguide import AutoMultivariateNormal as PyroMVN
from pyro.infer.autoguide import init_to_value as pyro_init_to_value

import numpyro_psvi
import numpyro_psvi.contrib.models
import pyro_psvi
import pyro_psvi.contrib.models
from psvi.contrib.targets import conjugate_linear_regression

STEPS = 1500
INNER = 5  # both engines' default inner_steps with mini-batch scores (a subsampled plate)
LR0, DECAY = 3e-3, 1000.0  # lr = LR0 / (1 + t / DECAY), t counting optimizer steps


def regression_data(n=400, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=n)).astype(np.float32)
    return x, y


def numpyro_fits(x, y, num_fits):
    model = partial(numpyro_psvi.contrib.models.linear_regression, subsample_size=40)
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
    model = partial(pyro_psvi.contrib.models.linear_regression, subsample_size=40)
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


# 41-51 s on the 2-core CI machine (17 fits): slow, so the default suite keeps its 10 minutes;
# each backend's fit of this regression against the exact posterior stays in the default run
# (tests/numpyro/test_minibatch.py, tests/pyro/test_minibatch.py).
@pytest.mark.slow
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


def test_mlp_classifier_log_joint_agrees_across_backends_and_by_hand():
    """Both backends' ``mlp_classifier`` give the log joint written out in NumPy at the same
    weights, with ``N(0, 1)`` priors and with fan-in scaled ones (``N(0, 1/fan_in)`` on the
    weight matrices, ``N(0, 1)`` on the biases). Float32 sums of ~100 terms of size ~10:
    agreement to 1e-4 relative is float32 rounding, a wrong prior scale moves it by > 10%."""
    from numpyro.infer.util import log_density
    from scipy.special import log_softmax
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=30)
    weights = {"w1": rng.normal(size=(6, 4)), "b1": rng.normal(size=4),
               "w2": rng.normal(size=(4, 3)), "b2": rng.normal(size=3)}  # fmt: skip
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    logits = np.tanh(x @ weights["w1"] + weights["b1"]) @ weights["w2"] + weights["b2"]
    log_lik = log_softmax(logits.astype(np.float64), axis=1)[np.arange(30), y].sum()
    for scale_by_fan_in in (False, True):
        prior = sum(
            norm.logpdf(w, scale=1 / np.sqrt(w.shape[0]) if scale_by_fan_in and w.ndim > 1 else 1.0).sum()
            for w in weights.values()
        )
        options = dict(hidden=4, num_classes=3, scale_by_fan_in=scale_by_fan_in)
        numpyro_value, _ = log_density(
            partial(numpyro_psvi.contrib.models.mlp_classifier, **options),
            (jnp.asarray(x), jnp.asarray(y)), {}, {k: jnp.asarray(v) for k, v in weights.items()},
        )  # fmt: skip
        conditioned = pyro.condition(
            partial(pyro_psvi.contrib.models.mlp_classifier, **options),
            {k: torch.as_tensor(v) for k, v in weights.items()},
        )
        pyro_value = pyro.poutine.trace(conditioned).get_trace(torch.as_tensor(x), torch.as_tensor(y))
        expected = prior + log_lik
        np.testing.assert_allclose(float(numpyro_value), expected, rtol=1e-4)
        np.testing.assert_allclose(float(pyro_value.log_prob_sum()), expected, rtol=1e-4)
