"""ArviZ export and VI diagnostics (Pyro)."""

import warnings
from functools import partial

import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import torch
from psvi_testing.arviz_checks import (
    B,
    check_datatree_matches_inference_data,
    check_diagnostics,
    check_idata,
    data,
    exact_and_misfit,
)
from pyro.infer.autoguide import AutoMultivariateNormal as PAutoMVN
from pyro.infer.autoguide import AutoNormal

import pyro_psvi
import pyro_psvi.arviz as parviz
from psvi.contrib.targets import conjugate_linear_regression
from pyro_psvi.contrib.models import linear_regression as p_linear_regression

pytestmark = pytest.mark.usefixtures("fresh_pyro")


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


def test_pyro_diagnostics_of_a_model_written_for_one_draw_are_those_of_a_broadcast_safe_one():
    """``x[idx] @ w`` fails under a plate of draws: its diagnostics and export are computed
    one draw at a time, and equal those of the same model written broadcast-safe (draws at
    once)."""
    x, y = map(torch.as_tensor, data())

    def for_one_draw(x, y):
        w = pyro.sample("w", pdist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=B) as idx:
            pyro.sample("y", pdist.Normal(x[idx] @ w, 1.0), obs=y[idx])

    broadcast_safe = partial(p_linear_regression, subsample_size=B)
    guide = AutoNormal(broadcast_safe, init_scale=0.3)
    guide(x, y)
    results = []
    for model in (broadcast_safe, for_one_draw):
        pyro.set_rng_seed(1)  # the same draws
        results.append(parviz.vi_diagnostics(model, guide, x, y, num_samples=40))
    # float32 log joints of ~-300 nats summed in another order: ~1e-5 relative.
    for name in ("elbo", "fisher", "khat"):
        assert results[0][name] == pytest.approx(results[1][name], rel=1e-4), name
    # So is the export: the same draws, their pointwise log-likelihoods (the predictive
    # draws take torch's random stream in another order: their shapes agree).
    exports = []
    for model in (broadcast_safe, for_one_draw):
        pyro.set_rng_seed(2)
        exports.append(parviz.to_inference_data(model, guide, x, y, num_samples=40, diagnostics=False))
    np.testing.assert_array_equal(exports[1].posterior["w"], exports[0].posterior["w"])
    np.testing.assert_allclose(exports[1].log_likelihood["y"], exports[0].log_likelihood["y"], rtol=1e-5)
    assert exports[1].posterior_predictive["y"].shape == exports[0].posterior_predictive["y"].shape


def test_pyro_export_as_an_arviz_1_datatree_equals_the_inference_data():
    """The twin of NumPyro's: ``datatree=True`` and ``datatree=False`` from the same seed
    give the same export, and PSIS-LOO right to its Monte Carlo error."""
    pytest.importorskip("arviz_base")
    pytest.importorskip("arviz_stats")
    model = partial(p_linear_regression, subsample_size=B)
    pyro.clear_param_store()
    guide = PAutoMVN(model)
    x, y = map(torch.as_tensor, data())
    guide(x, y)
    mean, cov = conjugate_linear_regression(data()[0], data()[1], prior_scale=1.0, noise_scale=1.0)
    tril = torch.as_tensor(np.linalg.cholesky(cov), dtype=torch.float32)
    store = pyro.get_param_store()
    store["AutoMultivariateNormal.loc"] = torch.as_tensor(mean, dtype=torch.float32)
    store["AutoMultivariateNormal.scale"] = tril.diagonal()
    store["AutoMultivariateNormal.scale_tril"] = tril / tril.diagonal()[:, None]
    exports = []
    for datatree in (True, False):
        pyro.set_rng_seed(3)
        exports.append(parviz.to_inference_data(model, guide, x, y, num_samples=1000, losses=np.arange(5.0),
                                                num_score_calls=20, datatree=datatree))  # fmt: skip
    check_datatree_matches_inference_data(*exports, np.asarray(x), np.asarray(y))


def test_arviz_functions_are_exported_at_the_package_top():
    import pyro_psvi
    import pyro_psvi.arviz

    assert pyro_psvi.to_inference_data is pyro_psvi.arviz.to_inference_data
    assert pyro_psvi.vi_diagnostics is pyro_psvi.arviz.vi_diagnostics


def test_pyro_inference_data_puts_deterministic_sites_in_the_posterior():
    x, y = map(torch.as_tensor, data())

    def model(x, y):
        w = pyro.sample("w", pdist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=B) as idx:
            mean = pyro.deterministic("mean", x[idx] @ w)
            pyro.sample("y", pdist.Normal(mean, 1.0), obs=y[idx])

    guide = AutoNormal(model)
    pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), vectorize_particles=False).run(
        50, x, y
    )
    idata = parviz.to_inference_data(model, guide, x, y, num_samples=8, num_chains=2, diagnostics=False)
    # Pyro records a deterministic site as an observed one: not an observation here.
    assert list(idata.log_likelihood.data_vars) == ["y"] and "mean" not in idata.posterior_predictive
    assert "mean" not in idata.observed_data
    w = idata.posterior["w"].values.reshape(-1, 3)
    mean = idata.posterior["mean"].values.reshape(-1, x.shape[0])  # over the full data
    np.testing.assert_allclose(mean, w @ x.numpy().T, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- mode coverage
# The targets of the NumPyro twin: two modes at (-4, -4) and (4, 4) (sd 0.5) under a
# wide prior; one mode at (4, 4) under N(0, 1): Gaussian, precision 5, mean 3.2.
def _bimodal_model():
    z = pyro.sample("z", pdist.Normal(0.0, 10.0).expand([2]).to_event(1))
    # Broadcast-safe (z's leading dims kept left of the modes' dim): the search's draws
    # are evaluated in one model pass.
    modes = torch.tensor([[-4.0, -4.0], [4.0, 4.0]])
    logs = -0.5 * torch.sum((z.unsqueeze(-2) - modes) ** 2, -1) / 0.25
    pyro.factor("modes", torch.logsumexp(logs, -1))


def _unimodal_model():
    z = pyro.sample("z", pdist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.factor("mode", -0.5 * torch.sum((z - 4.0) ** 2, -1) / 0.25)


def _normal_guide(model, loc, scale):
    guide = AutoNormal(model)
    guide()
    store = pyro.get_param_store()
    store["AutoNormal.locs.z"] = torch.full((2,), loc)
    store["AutoNormal.scales.z"] = torch.full((2,), scale)
    return guide


def test_pyro_mode_coverage_finds_the_mode_a_guide_misses():
    guide = _normal_guide(_bimodal_model, 4.0, 0.5)  # on one mode only
    with pytest.warns(UserWarning, match="AutoNormal misses posterior mass"):
        report = pyro_psvi.mode_coverage(_bimodal_model, guide, num_draws=400)
    # Adam's last steps jitter ~0.1 guide sd around the missed mode.
    np.testing.assert_allclose(report.uncovered, np.full(report.uncovered.shape, -4.0), atol=0.2)


def test_pyro_mode_coverage_passes_an_exact_fit():
    guide = _normal_guide(_unimodal_model, 3.2, 5**-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = pyro_psvi.mode_coverage(_unimodal_model, guide, num_draws=400)
    assert report.num_uncovered == 0 and report.num_searches == 32
