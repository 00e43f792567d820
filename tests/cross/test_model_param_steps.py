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
SVI's in the first few hundred updates). Without a trust region, and with one that pulls
the guide's step back, which must leave the model params' step whole."""

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


def numpyro_fit(make_engine) -> tuple[list[float], float]:
    """``theta`` after each update, and the guide's scale of ``z`` at the end."""
    engine = make_engine(numpyro_model, NumPyroAutoNormal(numpyro_model))
    y = jnp.asarray(Y)
    state, update, thetas = engine.init(jax.random.PRNGKey(0), y), jax.jit(engine.update), []
    for _ in range(UPDATES):
        state = update(state, y)[0]
        thetas.append(float(engine.get_params(state)["theta"]))
    return thetas, float(engine.get_params(state)["z_auto_scale"])


def numpyro_thetas(make_engine) -> list[float]:
    return numpyro_fit(make_engine)[0]


def pyro_model(y):
    theta = pyro.param("theta", torch.tensor(0.0))
    pyro.sample("z", pdist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", pdist.Normal(theta, 1.0), obs=y)


def pyro_fit(make_engine) -> tuple[list[float], float]:
    """``theta`` after each update, and the guide's scale of ``z`` at the end."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    engine, thetas = make_engine(pyro_model, PyroAutoNormal(pyro_model)), []
    for _ in range(UPDATES):
        engine.step(torch.as_tensor(Y))
        thetas.append(pyro.param("theta").item())
    return thetas, pyro.param("AutoNormal.scales.z").item()


def pyro_thetas(make_engine) -> list[float]:
    return pyro_fit(make_engine)[0]


# Each backend's engine, SVI and ELBO, and its Adam at a step size.
PPLS = {
    "numpyro": (numpyro_psvi.ProximalScoreVI, NumPyroSVI, NumPyroTraceELBO),
    "pyro": (pyro_psvi.ProximalScoreVI, PyroSVI, PyroTraceELBO),
}
ADAM = {"numpyro": lambda lr: numpyro.optim.Adam(lr), "pyro": lambda lr: pyro.optim.Adam({"lr": lr})}
THETAS = {"numpyro": numpyro_thetas, "pyro": pyro_thetas}
OPTIMIZERS = {"numpyro": NUMPYRO_OPTIMIZERS, "pyro": PYRO_OPTIMIZERS}


@pytest.mark.parametrize(
    ("backend", "name"), [(backend, name) for backend, named in OPTIMIZERS.items() for name in named]
)
def test_model_params_take_svis_optimizer_steps(backend, name):
    make_optim = OPTIMIZERS[backend][name]
    thetas, (engine, svi, elbo) = THETAS[backend], PPLS[backend]
    ours = thetas(
        lambda model, guide: engine(model, guide, make_optim(), inner_steps=INNER, trust_region=None)
    )
    reference = thetas(lambda model, guide: svi(model, guide, make_optim(), elbo()))
    # The same float32 gradient and optimizer arithmetic: agreement to round-off (values of
    # order 1e-3 to 5e-2); a step of the wrong size or count is off by a factor 0.5-20.
    np.testing.assert_allclose(ours, reference, rtol=1e-5)


FITS = {"numpyro": numpyro_fit, "pyro": pyro_fit}


@pytest.mark.parametrize("backend", PPLS)
def test_the_guides_trust_region_leaves_the_model_params_step_whole(backend):
    # Adam(0.03): the guide's twenty inner steps leave the trust region's budget on these
    # updates, so the guide's step is pulled back (its scale of z ends elsewhere than
    # without a trust region); theta's step stays SVI's.
    fit, (engine, svi, elbo) = FITS[backend], PPLS[backend]

    def optim():
        return ADAM[backend](0.03)

    bounded, bounded_scale = fit(lambda model, guide: engine(model, guide, optim(), inner_steps=INNER))
    _, unbounded_scale = fit(
        lambda model, guide: engine(model, guide, optim(), inner_steps=INNER, trust_region=None)
    )
    reference, _ = fit(lambda model, guide: svi(model, guide, optim(), elbo()))
    assert abs(bounded_scale - unbounded_scale) > 0.01 * unbounded_scale  # the pull-back acted
    np.testing.assert_allclose(bounded, reference, rtol=1e-5)  # as the tests above


# A subsampled plate with the user's own batch indices (Pyro's ``subsample=``; NumPyro's
# plate indices substituted, which the engine takes with ``reshuffle=False``): theta's
# step is the N/B-scaled one, as SVI's. The last iterate (no averaging: with it the
# params hold the average of the iterates, as the guide's do).
NUM, BATCH = 20, 5
Y_ALL = np.arange(NUM, dtype=np.float32) / 4.0
BATCHES = [np.arange(i * BATCH, (i + 1) * BATCH) for i in range(UPDATES)]


def numpyro_subsampled_model(y, idx):
    theta = numpyro.param("theta", 0.0)
    numpyro.sample("z", ndist.Normal(0.0, 1.0))
    with (
        numpyro.handlers.substitute(data={"data": idx}),
        numpyro.plate("data", NUM, subsample_size=BATCH) as ind,
    ):
        numpyro.sample("y", ndist.Normal(theta, 1.0), obs=y[ind])


def pyro_subsampled_model(y, idx):
    theta = pyro.param("theta", torch.tensor(0.0))
    pyro.sample("z", pdist.Normal(0.0, 1.0))
    with pyro.plate("data", NUM, subsample=idx) as ind:
        pyro.sample("y", pdist.Normal(theta, 1.0), obs=y[ind])


def numpyro_subsampled_thetas(make_engine) -> list[float]:
    engine = make_engine(numpyro_subsampled_model, NumPyroAutoNormal(numpyro_subsampled_model))
    y, batches = jnp.asarray(Y_ALL), [jnp.asarray(idx) for idx in BATCHES]
    state, update, thetas = engine.init(jax.random.PRNGKey(0), y, batches[0]), jax.jit(engine.update), []
    for idx in batches:
        state = update(state, y, idx)[0]
        thetas.append(float(engine.get_params(state)["theta"]))
    return thetas


def pyro_subsampled_thetas(make_engine) -> list[float]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    engine, thetas = make_engine(pyro_subsampled_model, PyroAutoNormal(pyro_subsampled_model)), []
    for idx in BATCHES:
        engine.step(torch.as_tensor(Y_ALL), torch.as_tensor(idx))
        thetas.append(pyro.param("theta").item())
    return thetas


SUBSAMPLED = {"numpyro": numpyro_subsampled_thetas, "pyro": pyro_subsampled_thetas}


@pytest.mark.parametrize("backend", SUBSAMPLED)
def test_a_subsampled_plate_scales_the_model_params_step_as_svis(backend):
    thetas, (engine, svi, elbo) = SUBSAMPLED[backend], PPLS[backend]
    options = {"reshuffle": False} if backend == "numpyro" else {}

    def optim():
        return ADAM[backend](LR)

    ours = thetas(
        lambda model, guide: engine(
            model, guide, optim(), inner_steps=INNER, trust_region=None, average_iterates=False, **options
        )
    )
    reference = thetas(lambda model, guide: svi(model, guide, optim(), elbo()))
    np.testing.assert_allclose(ours, reference, rtol=1e-5)  # as the tests above


# A network in the model (``pyro.module``'s torch module, NumPyro's ``flax_module``): its
# weights step as SVI's (the default trust region, Adam(0.03)).
X_NET = np.linspace(-1.0, 1.0, 8, dtype=np.float32)[:, None]
Y_NET = 2.0 * X_NET[:, 0] + 1.0


def numpyro_network_weights(make_engine) -> np.ndarray:
    import flax.linen as nn
    from numpyro.contrib.module import flax_module

    def model(x, y):
        net = flax_module("net", nn.Dense(1), input_shape=(1, 1))
        numpyro.sample("z", ndist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", ndist.Normal(net(x)[:, 0], 1.0), obs=y)

    engine = make_engine(model, NumPyroAutoNormal(model))
    x, y = jnp.asarray(X_NET), jnp.asarray(Y_NET)
    state, update, weights = engine.init(jax.random.PRNGKey(0), x, y), jax.jit(engine.update), []
    for _ in range(UPDATES):
        state = update(state, x, y)[0]
        net = engine.get_params(state)["net$params"]
        weights.append([float(net["kernel"][0, 0]), float(net["bias"][0])])
    return np.array(weights)


def pyro_network_weights(make_engine) -> np.ndarray:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    net = torch.nn.Linear(1, 1)

    def model(x, y):
        pyro.module("net", net)
        pyro.sample("z", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", pdist.Normal(net(x).squeeze(-1), 1.0), obs=y)

    engine, weights = make_engine(model, PyroAutoNormal(model)), []
    for _ in range(UPDATES):
        engine.step(torch.as_tensor(X_NET), torch.as_tensor(Y_NET))
        weights.append([net.weight.item(), net.bias.item()])
    return np.array(weights)


NETWORKS = {"numpyro": numpyro_network_weights, "pyro": pyro_network_weights}


@pytest.mark.parametrize("backend", NETWORKS)
def test_a_networks_weights_in_the_model_step_as_svis(backend):
    fit, (engine, svi, elbo) = NETWORKS[backend], PPLS[backend]

    def optim():
        return ADAM[backend](0.03)

    ours = fit(lambda model, guide: engine(model, guide, optim(), inner_steps=INNER))
    reference = fit(lambda model, guide: svi(model, guide, optim(), elbo()))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)  # as the tests above
