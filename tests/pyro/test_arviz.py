"""ArviZ export and VI diagnostics (Pyro)."""

from functools import partial

import pyro
import pytest
import torch
from psvi_testing.arviz_checks import B, check_diagnostics, check_idata, data, exact_and_misfit
from pyro.infer.autoguide import AutoMultivariateNormal as PAutoMVN

import pyro_psvi
import pyro_psvi.arviz as parviz
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


def test_arviz_functions_are_exported_at_the_package_top():
    import pyro_psvi
    import pyro_psvi.arviz

    assert pyro_psvi.to_inference_data is pyro_psvi.arviz.to_inference_data
    assert pyro_psvi.vi_diagnostics is pyro_psvi.arviz.vi_diagnostics
