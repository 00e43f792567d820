"""The conjugate regression of the ArviZ tests and the checks made on both backends'
exports and diagnostics."""

import arviz as az
import numpy as np
import pytest
from scipy import stats

from psvi.contrib.targets import conjugate_linear_regression

N, B = 60, 20


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
    np.testing.assert_allclose(
        idata.log_likelihood["y"].values.reshape(-1, N), expected, rtol=1e-4, atol=1e-4
    )
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
    # What describes a VI fit: the guide's diagnostics (what they separate is tested in
    # check_diagnostics), and a note that the pseudo-chains' ESS/R-hat say nothing. The
    # ELBO is below log p(y) by KL(q || p) >= 0 up to Monte Carlo noise (the log weights
    # of these near-Gaussian fits vary by well under 1 nat, so 0.1 nat is > 5 standard
    # errors at 200 draws); these short fits are within 0.5 nat of the posterior.
    stats_ = idata.sample_stats
    gap = log_evidence(x, y) - stats_["elbo"].item()
    assert -0.1 < gap < 0.5, gap
    assert np.isfinite(stats_["khat"].item())
    assert 0 <= stats_["fisher"].item() < np.inf
    assert "no information" in idata.posterior.attrs["draws"]


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


def exact_loo(x, y):
    """The conjugate regression's leave-one-out elpd in closed form: ``sum_i log N(y_i |
    x_i' m_-i, 1 + x_i' P_-i^-1 x_i)``, ``P_-i = I + X'X - x_i x_i'``, ``m_-i = P_-i^-1 (X'y
    - x_i y_i)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    precision, total = np.eye(x.shape[1]) + x.T @ x, 0.0
    for xi, yi in zip(x, y, strict=True):
        left_out = precision - np.outer(xi, xi)
        mean = np.linalg.solve(left_out, x.T @ y - xi * yi)
        total += stats.norm.logpdf(yi, xi @ mean, np.sqrt(1 + xi @ np.linalg.solve(left_out, xi)))
    return total


def check_datatree_matches_inference_data(datatree, idata, x, y):
    """ArviZ 1.x's export (``datatree=True``) against ArviZ 0.x's from the same draws of the
    exact posterior: the same groups, dims, values and diagnostics, and each library's
    PSIS-LOO on its container within its Monte Carlo error of the closed form
    (:func:`exact_loo`). Tolerance: a point's importance-sampling estimate
    ``-log mean_s 1/p(y_i | w_s)`` has standard error ``sd_s(1/p) / (sqrt(S) mean_s(1/p))``
    (delta method); the points share the draws, so the sum's standard error is at most
    the sum of theirs: three of those."""
    import arviz_stats
    import xarray as xr

    assert isinstance(datatree, xr.DataTree)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        for name, value in idata[group].data_vars.items():
            assert datatree[group][name].dims == value.dims, (group, name)
            np.testing.assert_array_equal(datatree[group][name].values, value.values)
    assert datatree["sample_stats"]["loss"].dims == ("step",)
    for name in ("num_score_calls", "khat", "elbo", "fisher"):
        assert datatree["sample_stats"][name].item() == idata.sample_stats[name].item(), name
    assert "no information" in datatree["posterior"].attrs["draws"]
    log_lik = idata.log_likelihood["y"].values.reshape(-1, N).astype(np.float64)
    inverse = np.exp(-log_lik)
    tolerance = 3 * np.sum(inverse.std(0) / (np.sqrt(len(inverse)) * inverse.mean(0)))
    assert arviz_stats.loo(datatree).elpd == pytest.approx(exact_loo(x, y), abs=tolerance)
    assert az.loo(idata).elpd_loo == pytest.approx(exact_loo(x, y), abs=tolerance)
