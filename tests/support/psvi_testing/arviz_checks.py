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
