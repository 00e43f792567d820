"""Model params take one step of the user's optimizer per update, as SVI's, in both
backends: their objective in an update is linear (the expected log joint linearized at
``theta_t``), so each of the ``K`` inner steps would move them as far again.

The model ``y_i ~ N(theta, 1)`` beside a latent ``z`` that ``y`` does not depend on: the
gradient of the log joint in ``theta`` is ``sum_i (y_i - theta)`` at every particle, so
with SGD (no trust region, whose pull-back could shorten the step) the updates are
exactly ``theta <- theta + lr sum_i (y_i - theta)``: ``theta_1 = 15 lr`` from 0, where
``K = 20`` steps would make it ``20 * 15 lr``."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as pdist
import pytest
import torch
from numpyro.infer.autoguide import AutoNormal as NumPyroAutoNormal
from pyro.infer.autoguide import AutoNormal as PyroAutoNormal

import numpyro_psvi
import pyro_psvi

Y = np.arange(1.0, 6.0, dtype=np.float32)
LR, UPDATES, INNER = 1e-3, 3, 20


def expected_thetas() -> list[float]:
    theta, thetas = 0.0, []
    for _ in range(UPDATES):
        theta = theta + LR * float(np.sum(Y - theta))
        thetas.append(theta)
    return thetas


def numpyro_thetas() -> list[float]:
    def model(y):
        theta = numpyro.param("theta", 0.0)
        numpyro.sample("z", ndist.Normal(0.0, 1.0))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", ndist.Normal(theta, 1.0), obs=y)

    svi = numpyro_psvi.ProximalScoreVI(
        model, NumPyroAutoNormal(model), numpyro.optim.SGD(LR), inner_steps=INNER, trust_region=None
    )
    y = jnp.asarray(Y)
    state, update, thetas = svi.init(jax.random.PRNGKey(0), y), jax.jit(svi.update), []
    for _ in range(UPDATES):
        state = update(state, y)[0]
        thetas.append(float(svi.get_params(state)["theta"]))
    assert int(state.num_rejected) == 0
    return thetas


def pyro_thetas() -> list[float]:
    def model(y):
        theta = pyro.param("theta", torch.tensor(0.0))
        pyro.sample("z", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", pdist.Normal(theta, 1.0), obs=y)

    pyro.clear_param_store()
    svi = pyro_psvi.ProximalScoreVI(
        model, PyroAutoNormal(model), pyro.optim.SGD({"lr": LR}), inner_steps=INNER, trust_region=None
    )
    thetas = []
    for _ in range(UPDATES):
        svi.step(torch.as_tensor(Y))
        thetas.append(pyro.param("theta").item())
    assert svi.num_rejected == 0
    return thetas


@pytest.mark.parametrize("fit", [numpyro_thetas, pyro_thetas], ids=["numpyro", "pyro"])
def test_model_params_take_one_optimizer_step_per_update(fit):
    # float32 arithmetic on values of order 0.01-0.05: agreement to 1e-6 relative is
    # round-off; twenty steps per update would be off by a factor near 20.
    np.testing.assert_allclose(fit(), expected_thetas(), rtol=1e-5)
