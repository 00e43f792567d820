"""ArviZ export and VI diagnostics, both backends."""

from functools import partial

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import pyro
import pytest
import torch
from numpyro.infer.autoguide import AutoMultivariateNormal as NAutoMVN
from pyro.infer.autoguide import AutoMultivariateNormal as PAutoMVN
from scipy import stats

import numpyro_psvi
import numpyro_psvi.arviz as narviz
import pyro_psvi
import pyro_psvi.arviz as parviz
from numpyro_psvi.models import linear_regression as n_linear_regression
from psvi.targets import conjugate_linear_regression
from pyro_psvi.models import linear_regression as p_linear_regression

matplotlib.use("Agg")
N, B = 60, 20


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(1)
    yield
    pyro.clear_param_store()


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    return x, (x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=N)).astype(np.float32)


def check_idata(idata, draws_w, x, y, num_samples):
    """Shared checks: groups, dims, full-data pointwise log-likelihood, ArviZ functions."""
    assert idata.posterior["w"].shape == (4, num_samples // 4, 3)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")
    assert idata.log_likelihood["y"].shape == (4, num_samples // 4, N)  # the FULL data
    assert idata.posterior_predictive["y"].shape == (4, num_samples // 4, N)
    np.testing.assert_allclose(idata.observed_data["y"].values, y)
    # Pointwise log-likelihood: unscaled N(y_i | x_i w, 1) at the posterior draws.
    w = idata.posterior["w"].values.reshape(-1, 3)
    expected = stats.norm.logpdf(y, loc=w @ x.T, scale=1.0)
    np.testing.assert_allclose(idata.log_likelihood["y"].values.reshape(-1, N), expected, rtol=1e-4,
                               atol=1e-4)
    # Posterior means match the guide's own draws: 5 standard errors of the difference
    # of two independent means (3 coordinates).
    se = np.sqrt(w.var(0) / len(w) + draws_w.var(0) / len(draws_w))
    assert np.all(np.abs(w.mean(0) - draws_w.mean(0)) < 5 * se)
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo) and loo.n_data_points == N
    assert np.isfinite(az.waic(idata).elpd_waic)
    summary = az.summary(idata)
    assert summary.loc["w[0]", "r_hat"] < 1.05
    assert set(az.compare({"a": idata, "b": idata}).index) == {"a", "b"}
    az.plot_posterior(idata, var_names=["w"])
    assert idata.sample_stats["num_score_calls"].item() > 0


def test_numpyro_inference_data_round_trip():
    x, y = data()
    model = partial(n_linear_regression, subsample_size=B)
    guide = NAutoMVN(model)
    svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
    result = svi.run(jax.random.PRNGKey(0), 500, jnp.asarray(x), jnp.asarray(y), progress_bar=False)
    idata = narviz.to_inference_data(
        model, guide, result.params, jnp.asarray(x), jnp.asarray(y), num_samples=400,
        losses=result.losses, num_score_calls=result.state.num_score_calls,
    )  # fmt: skip
    own = guide.sample_posterior(jax.random.PRNGKey(7), result.params, sample_shape=(2000,))
    check_idata(idata, np.asarray(own["w"], np.float64), x, y, 400)
    assert idata.sample_stats["loss"].shape == (500,)


def test_pyro_inference_data_round_trip():
    x, y = data()
    model = partial(p_linear_regression, subsample_size=B)
    guide = PAutoMVN(model)
    svi = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    losses = svi.run(300, torch.as_tensor(x), torch.as_tensor(y))
    idata = parviz.to_inference_data(
        model, guide, torch.as_tensor(x), torch.as_tensor(y), num_samples=200, losses=losses,
        num_score_calls=svi.num_score_calls,
    )  # fmt: skip
    with torch.no_grad():
        own = guide.get_posterior().sample((2000,)).double().numpy()
    check_idata(idata, own, x, y, 200)


def exact_and_misfit(set_params):
    """k-hat, ELBO and Fisher of the exact posterior and of a narrow, shifted guide."""
    x, y = data()
    mean, cov = conjugate_linear_regression(x, y, prior_scale=1.0, noise_scale=1.0)
    exact = set_params(mean, np.linalg.cholesky(cov))
    misfit = set_params(mean + 3 * np.sqrt(np.diag(cov)), 0.1 * np.linalg.cholesky(cov))
    return exact, misfit, mean, cov, x, y


def log_evidence(x, y):
    """log N(y | 0, X X' + I) of the conjugate regression."""
    return stats.multivariate_normal.logpdf(y, np.zeros(N), x @ x.T + np.eye(N))


def check_diagnostics(exact, misfit, x, y):
    # Exact posterior: the weights p(z, y) / q(z) are the constant p(y): k-hat far below
    # 0.7, the ELBO equals log p(y) up to float32 round-off, the Fisher divergence is 0.
    assert exact["khat"] < 0.5
    assert exact["elbo"] == pytest.approx(log_evidence(x, y), abs=1e-2)
    assert exact["fisher"] < 1e-6
    # A guide 10x too narrow and 3 sd off: heavy-tailed weights.
    assert misfit["khat"] > 0.7
    assert misfit["elbo"] < exact["elbo"] - 1 and misfit["fisher"] > 1.0


def test_numpyro_diagnostics_separate_exact_from_misfit():
    model = partial(n_linear_regression, subsample_size=B)

    def diagnostics(loc, tril):
        guide = NAutoMVN(model)
        svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
        x, y = map(jnp.asarray, data())
        svi.init(jax.random.PRNGKey(0), x, y)
        params = {
            "auto_loc": jnp.asarray(loc, jnp.float32),
            "auto_scale_tril": jnp.asarray(tril, jnp.float32),
        }
        return narviz.vi_diagnostics(model, guide, params, x, y, num_samples=1000)

    exact, misfit, *_, x, y = exact_and_misfit(diagnostics)
    check_diagnostics(exact, misfit, x, y)


def test_pyro_diagnostics_separate_exact_from_misfit():
    model = partial(p_linear_regression, subsample_size=B)

    def diagnostics(loc, tril):
        pyro.clear_param_store()
        guide = PAutoMVN(model)
        x, y = map(torch.as_tensor, data())
        guide(x, y)
        store = pyro.get_param_store()
        tril = torch.as_tensor(tril, dtype=torch.float32)
        scale = tril.diagonal()
        store["AutoMultivariateNormal.loc"] = torch.as_tensor(loc, dtype=torch.float32)
        store["AutoMultivariateNormal.scale"] = scale
        store["AutoMultivariateNormal.scale_tril"] = tril / scale[:, None]
        return parviz.vi_diagnostics(model, guide, x, y, num_samples=300)

    exact, misfit, *_, x, y = exact_and_misfit(diagnostics)
    check_diagnostics(exact, misfit, x, y)


def test_numpyro_inference_data_uses_the_learned_model_params():
    x, y = map(jnp.asarray, data())

    def model(x, y):
        sigma = numpyro.param("sigma", 1.0, constraint=numpyro.distributions.constraints.positive)
        w = numpyro.sample("w", numpyro.distributions.Normal(jnp.zeros(3), 1.0).to_event(1))
        with numpyro.plate("data", N):
            numpyro.sample("y", numpyro.distributions.Normal(x @ w, sigma), obs=y)

    guide = NAutoMVN(model)
    svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
    result = svi.run(jax.random.PRNGKey(0), 300, x, y, progress_bar=False)
    sigma = float(result.params["sigma"])
    assert abs(sigma - 1.0) > 0.05  # it was learned
    idata = narviz.to_inference_data(model, guide, result.params, x, y, num_samples=40)
    w = idata.posterior["w"].values.reshape(-1, 3)
    expected = stats.norm.logpdf(np.asarray(y), loc=w @ np.asarray(x).T, scale=sigma)
    np.testing.assert_allclose(idata.log_likelihood["y"].values.reshape(-1, N), expected, rtol=1e-4,
                               atol=1e-4)
