"""Model params take one step of the user's optimizer per update, as SVI's, in both
backends: their objective in an update is linear (the expected log joint linearized at
``theta_t``), so each of the ``K`` inner steps would move them as far again; and the
optimizer counts that step as SVI counts its steps (Adam's bias correction, a schedule),
not as the guide's ``K`` inner steps.

The model ``y_i ~ N(theta, 1)`` beside a latent ``z`` that ``y`` does not depend on: the
gradient of the log joint in ``theta`` is ``sum_i (y_i - theta)`` at every particle, and
``Trace_ELBO``'s gradient in ``theta`` is the same, exactly, whatever ``z``'s draw. So
``SVI`` with the same optimizer is the reference: with SGD, ``theta <- theta + lr sum_i
(y_i - theta)`` (``theta_1 = 15 lr`` from 0, where ``K = 20`` steps made it ``20 * 15
lr``); with Adam, ClippedAdam and a decaying schedule, each update's step at the update's
count (the count of all inner steps, ``20 (t - 1) + 1``, gave Adam steps 0.7-3.7 times
SVI's in the first few hundred updates). No trust region, whose pull-back could shorten a step."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import optax
import pyro
import pyro.distributions as pdist
import pytest
import torch
from numpyro.infer import SVI as NumPyroSVI
from numpyro.infer import Trace_ELBO as NumPyroTraceELBO
from numpyro.infer.autoguide import AutoNormal as NumPyroAutoNormal
from pyro.infer import SVI as PyroSVI
from pyro.infer import Trace_ELBO as PyroTraceELBO
from pyro.infer.autoguide import AutoNormal as PyroAutoNormal

import numpyro_psvi
import pyro_psvi

Y = np.arange(1.0, 6.0, dtype=np.float32)
LR, UPDATES, INNER = 1e-3, 4, 20

NUMPYRO_OPTIMIZERS = {
    "SGD": lambda: numpyro.optim.SGD(LR),
    "Adam": lambda: numpyro.optim.Adam(LR),
    "ClippedAdam": lambda: numpyro.optim.ClippedAdam(LR),
    "Adam with a schedule": lambda: numpyro.optim.Adam(lambda step: LR * 0.5**step),
    "optax adam with a schedule": lambda: optax.adam(optax.exponential_decay(LR, 1, 0.5)),
}
PYRO_OPTIMIZERS = {
    "SGD": lambda: pyro.optim.SGD({"lr": LR}),
    "Adam": lambda: pyro.optim.Adam({"lr": LR}),
    "ClippedAdam with a decay": lambda: pyro.optim.ClippedAdam({"lr": LR, "lrd": 0.5}),
}


def numpyro_model(y):
    theta = numpyro.param("theta", 0.0)
    numpyro.sample("z", ndist.Normal(0.0, 1.0))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", ndist.Normal(theta, 1.0), obs=y)


def numpyro_thetas(make_engine) -> list[float]:
    engine = make_engine(numpyro_model, NumPyroAutoNormal(numpyro_model))
    y = jnp.asarray(Y)
    state, update, thetas = engine.init(jax.random.PRNGKey(0), y), jax.jit(engine.update), []
    for _ in range(UPDATES):
        state = update(state, y)[0]
        thetas.append(float(engine.get_params(state)["theta"]))
    return thetas


def pyro_model(y):
    theta = pyro.param("theta", torch.tensor(0.0))
    pyro.sample("z", pdist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", pdist.Normal(theta, 1.0), obs=y)


def pyro_thetas(make_engine) -> list[float]:
    pyro.clear_param_store()
    engine, thetas = make_engine(pyro_model, PyroAutoNormal(pyro_model)), []
    for _ in range(UPDATES):
        engine.step(torch.as_tensor(Y))
        thetas.append(pyro.param("theta").item())
    return thetas


@pytest.mark.parametrize("optimizer", NUMPYRO_OPTIMIZERS)
def test_numpyro_model_params_take_svis_optimizer_steps(optimizer):
    make_optim = NUMPYRO_OPTIMIZERS[optimizer]
    ours = numpyro_thetas(
        lambda model, guide: numpyro_psvi.ProximalScoreVI(
            model, guide, make_optim(), inner_steps=INNER, trust_region=None
        )
    )
    svi = numpyro_thetas(lambda model, guide: NumPyroSVI(model, guide, make_optim(), NumPyroTraceELBO()))
    # The same float32 gradient and optimizer arithmetic: agreement to round-off (values of
    # order 1e-3 to 5e-2); a step of the wrong size or count is off by a factor 0.5-20.
    np.testing.assert_allclose(ours, svi, rtol=1e-5)


@pytest.mark.parametrize("optimizer", PYRO_OPTIMIZERS)
def test_pyro_model_params_take_svis_optimizer_steps(optimizer):
    make_optim = PYRO_OPTIMIZERS[optimizer]
    ours = pyro_thetas(
        lambda model, guide: pyro_psvi.ProximalScoreVI(
            model, guide, make_optim(), inner_steps=INNER, trust_region=None
        )
    )
    svi = pyro_thetas(lambda model, guide: PyroSVI(model, guide, make_optim(), PyroTraceELBO()))
    np.testing.assert_allclose(ours, svi, rtol=1e-5)  # as for NumPyro above
