"""The Pyro and NumPyro forecasters agree."""

from functools import partial

import numpy as np
import pyro
import pytest
import torch

from pyro_psvi.contrib.forecasting import DLinear, forecaster
from pyro_psvi.contrib.models import bayesian_module, fan_in_prior


def test_pyro_and_numpyro_forecasters_agree():
    """The same DLinear weights give the same forecasts and the same log joint (priors,
    noise scale and likelihood) in both backends: the two forecasters are one model."""
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from numpyro.contrib.module import random_flax_module
    from numpyro.infer.util import log_density

    from numpyro_psvi.contrib import forecasting as nforecasting
    from numpyro_psvi.contrib.models import fan_in_prior as numpyro_fan_in_prior

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 24, 3)).astype(np.float32)
    y = rng.standard_normal((6, 12, 3)).astype(np.float32)
    net = DLinear(24, 12, kernel_size=5)
    values = {name: p.detach().clone() + 0.1 * torch.randn_like(p) for name, p in net.named_parameters()}
    values["noise_scale"] = torch.tensor([0.5, 0.8, 1.3])
    bayesian_module(net, fan_in_prior(2.0))
    pyro_model = pyro.poutine.condition(partial(forecaster, net), data=values)
    trace = pyro.poutine.trace(pyro_model).get_trace(torch.as_tensor(x), torch.as_tensor(y))
    pyro_log_joint = float(trace.log_prob_sum())

    flax_net = nforecasting.DLinear(24, 12, kernel_size=5)

    def make_net():
        return random_flax_module("dlinear", flax_net, numpyro_fan_in_prior(2.0), input_shape=(1, 24, 3))

    params = {"noise_scale": jnp.asarray(values["noise_scale"].numpy())}
    for part in ("seasonal", "trend"):
        params[f"dlinear/{part}.kernel"] = jnp.asarray(values[f"{part}.weight"].numpy().T)
        params[f"dlinear/{part}.bias"] = jnp.asarray(values[f"{part}.bias"].numpy())
    numpyro_log_joint, model_trace = log_density(
        partial(nforecasting.forecaster, make_net), (jnp.asarray(x), jnp.asarray(y)), {}, params
    )
    np.testing.assert_allclose(
        np.asarray(model_trace["mean"]["value"]), trace.nodes["mean"]["value"].detach().numpy(), atol=1e-5
    )
    # float32 sums of ~600 terms of size ~1: agreement to a few ulps of the total
    assert float(numpyro_log_joint) == pytest.approx(pyro_log_joint, rel=1e-5)
