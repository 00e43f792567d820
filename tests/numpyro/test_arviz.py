"""ArviZ export and VI diagnostics (NumPyro)."""

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro.infer.autoguide import AutoMultivariateNormal as NAutoMVN
from psvi_testing.arviz_checks import (
    B,
    N,
    check_datatree_matches_inference_data,
    check_diagnostics,
    check_idata,
    data,
    exact_and_misfit,
)
from scipy import stats

import numpyro_psvi
import numpyro_psvi.arviz as narviz
from numpyro_psvi.contrib.models import linear_regression as n_linear_regression
from psvi.contrib.targets import conjugate_linear_regression


@pytest.mark.slow  # 13-25 s on the 2-core CI machine, a Pyro twin or sibling in the default suite
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


@pytest.mark.slow  # 24 s on this 2-core machine; the Pyro twin is in the default suite
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


@pytest.mark.slow  # 13-25 s on the 2-core CI machine, a Pyro twin or sibling in the default suite
def test_numpyro_inference_data_uses_the_learned_model_params():
    x, y = map(jnp.asarray, data())

    def model(x, y):
        sigma = numpyro.param("sigma", 1.0, constraint=numpyro.distributions.constraints.positive)
        w = numpyro.sample("w", numpyro.distributions.Normal(jnp.zeros(3), 1.0).to_event(1))
        with numpyro.plate("data", N):
            mean = numpyro.deterministic("mean", x @ w)
            numpyro.sample("y", numpyro.distributions.Normal(mean, sigma), obs=y)

    guide = NAutoMVN(model)
    svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
    result = svi.run(jax.random.PRNGKey(0), 300, x, y, progress_bar=False)
    sigma = float(result.params["sigma"])
    assert abs(sigma - 1.0) > 0.05  # it was learned
    idata = narviz.to_inference_data(model, guide, result.params, x, y, num_samples=40)
    w = idata.posterior["w"].values.reshape(-1, 3)
    expected = stats.norm.logpdf(np.asarray(y), loc=w @ np.asarray(x).T, scale=sigma)
    np.testing.assert_allclose(
        idata.log_likelihood["y"].values.reshape(-1, N), expected, rtol=1e-4, atol=1e-4
    )
    # A deterministic site is a function of the latents: in the posterior, at each draw.
    assert list(idata.log_likelihood.data_vars) == ["y"] and "mean" not in idata.posterior_predictive
    mean = idata.posterior["mean"].values.reshape(-1, N)
    np.testing.assert_allclose(mean, w @ np.asarray(x).T, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 13 s on this 2-core machine; the Pyro twin is in the default suite
def test_numpyro_export_as_an_arviz_1_datatree_equals_the_inference_data():
    """``datatree=True`` (ArviZ 1.x's ``arviz-base``) and ``datatree=False`` (ArviZ 0.x)
    from the same key: the same draws, log-likelihoods and diagnostics, and the same
    PSIS-LOO, right to its Monte Carlo error (:func:`check_datatree_matches_inference_data`;
    the guide is the exact posterior)."""
    pytest.importorskip("arviz_base")
    pytest.importorskip("arviz_stats")
    model = partial(n_linear_regression, subsample_size=B)
    guide = NAutoMVN(model)
    x, y = map(jnp.asarray, data())
    numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2)).init(jax.random.PRNGKey(0), x, y)
    mean, cov = conjugate_linear_regression(np.asarray(x), np.asarray(y), prior_scale=1.0, noise_scale=1.0)
    params = {"auto_loc": jnp.asarray(mean, jnp.float32),
              "auto_scale_tril": jnp.asarray(np.linalg.cholesky(cov), jnp.float32)}  # fmt: skip
    exports = [
        narviz.to_inference_data(
            model,
            guide,
            params,
            x,
            y,
            num_samples=400,
            losses=np.arange(5.0),
            num_score_calls=20,
            datatree=datatree,
        )  # fmt: skip
        for datatree in (True, False)
    ]
    check_datatree_matches_inference_data(*exports, np.asarray(x), np.asarray(y))


def test_arviz_functions_are_exported_at_the_package_top():
    import numpyro_psvi
    import numpyro_psvi.arviz

    assert numpyro_psvi.to_inference_data is numpyro_psvi.arviz.to_inference_data
    assert numpyro_psvi.vi_diagnostics is numpyro_psvi.arviz.vi_diagnostics


# ---------------------------------------------------------------- mode coverage
# Two modes at (-4, -4) and (4, 4) (sd 0.5) under a wide prior; or one mode at (4, 4)
# under N(0, 1), a Gaussian posterior: precision 1 + 1/0.25 = 5, mean 4 * 4 / 5 = 3.2.
def _bimodal_model():
    z = numpyro.sample("z", numpyro.distributions.Normal(0.0, 10.0).expand([2]).to_event(1))
    logs = -0.5 * jnp.sum((z - jnp.array([[-4.0, -4.0], [4.0, 4.0]])) ** 2, -1) / 0.25
    numpyro.factor("modes", jax.scipy.special.logsumexp(logs, -1))


def _unimodal_model():
    z = numpyro.sample("z", numpyro.distributions.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.factor("mode", -0.5 * jnp.sum((z - 4.0) ** 2, -1) / 0.25)


def _normal_params(model, loc, scale):
    from numpyro.infer.autoguide import AutoNormal

    guide = AutoNormal(model)
    numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2)).init(jax.random.PRNGKey(0))
    return guide, {"z_auto_loc": jnp.full(2, loc), "z_auto_scale": jnp.full(2, scale)}


def test_numpyro_mode_coverage_finds_the_mode_a_guide_misses():
    guide, params = _normal_params(_bimodal_model, 4.0, 0.5)  # on one mode only
    with pytest.warns(UserWarning, match="AutoNormal misses posterior mass"):
        report = numpyro_psvi.mode_coverage(_bimodal_model, guide, params, num_draws=400)
    # Adam's last steps jitter ~0.1 guide sd around the missed mode.
    np.testing.assert_allclose(report.uncovered, np.full(report.uncovered.shape, -4.0), atol=0.2)


def test_numpyro_mode_coverage_passes_an_exact_fit():
    guide, params = _normal_params(_unimodal_model, 3.2, 1 / np.sqrt(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = numpyro_psvi.mode_coverage(_unimodal_model, guide, params, num_draws=400)
    assert report.num_uncovered == 0 and report.num_searches == 32
