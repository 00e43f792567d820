"""Model parameters learned jointly (variational EM), Pyro.

Regression with a learned noise scale ``sigma`` (a model param) and a conjugate
N(0, 1) prior on the weights: the EM fixed point is the type-II maximum-likelihood
``sigma`` (the gradient of E_q[log p_sigma] is the evidence's gradient when q is the
exact posterior), and the weight posterior is the closed form at that ``sigma``."""

import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import torch
from psvi_testing.em_regression import UPDATES, D, N, check, data
from pyro.infer.autoguide import AutoMultivariateNormal as PAutoMVN
from pyro.infer.autoguide import init_to_value as p_init_to_value

import pyro_psvi


@pytest.mark.slow  # ~75 s on the 2-core dev machine; the NumPyro twin (same check) runs by default
def test_pyro_learns_model_params_by_variational_em():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(1)
    x, y = data()

    def model(x, y):
        sigma = pyro.param("sigma", torch.tensor(1.0), constraint=pdist.constraints.positive)
        w = pyro.sample("w", pdist.Normal(torch.zeros(D), 1.0).to_event(1))
        with pyro.plate("data", N):
            pyro.sample("y", pdist.Normal((x * w).sum(-1), sigma), obs=y)

    guide = PAutoMVN(model, init_loc_fn=p_init_to_value(values={"w": torch.zeros(D)}))
    # The NumPyro test's schedule: the scheduler steps once per update of 20 inner steps.
    scheduler = pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-2},
         "lr_lambda": lambda update: 1.0 / (1.0 + 20 * update / 4000.0)}
    )  # fmt: skip
    svi = pyro_psvi.ProximalScoreVI(model, guide, scheduler)
    sigmas = []
    for _ in range(UPDATES):
        svi.step(torch.as_tensor(x), torch.as_tensor(y))
        scheduler.step()
        sigmas.append(pyro.param("sigma").item())
    assert svi.num_rejected == 0 and svi.vectorize_particles
    posterior = guide.get_posterior()
    check(
        np.asarray(sigmas),
        posterior.loc.detach().double().numpy(),
        posterior.covariance_matrix.detach().double().numpy(),
        x,
        y,
    )
