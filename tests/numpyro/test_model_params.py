"""Model parameters learned jointly (variational EM), NumPyro.

Regression with a learned noise scale ``sigma`` (a model param) and a conjugate
N(0, 1) prior on the weights: the EM fixed point is the type-II maximum-likelihood
``sigma`` (the gradient of E_q[log p_sigma] is the evidence's gradient when q is the
exact posterior), and the weight posterior is the closed form at that ``sigma``."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import optax
import pytest
from numpyro.infer.autoguide import AutoMultivariateNormal as NAutoMVN
from numpyro.infer.initialization import init_to_value as n_init_to_value
from psvi_testing.em_regression import UPDATES, D, N, check, data

import numpyro_psvi


def test_numpyro_learns_model_params_by_variational_em():
    x, y = map(jnp.asarray, data())

    def model(x, y):
        sigma = numpyro.param("sigma", 1.0, constraint=ndist.constraints.positive)
        w = numpyro.sample("w", ndist.Normal(jnp.zeros(D), 1.0).to_event(1))
        with numpyro.plate("data", N):
            numpyro.sample("y", ndist.Normal(x @ w, sigma), obs=y)

    guide = NAutoMVN(model, init_loc_fn=n_init_to_value(values={"w": jnp.zeros(D)}))
    svi = numpyro_psvi.ProximalScoreVI(model, guide, optax.adam(lambda t: 1e-2 / (1 + t / 4000.0)))
    state = svi.init(jax.random.PRNGKey(0), x, y)

    def body(state, _):
        state, _ = svi.update(state, x, y)
        return state, svi.get_params(state)["sigma"]

    state, sigmas = jax.jit(lambda s: jax.lax.scan(body, s, None, length=UPDATES))(state)
    params = svi.get_params(state)
    tril = np.asarray(params["auto_scale_tril"], np.float64)
    assert int(state.num_rejected) == 0
    check(np.asarray(sigmas), np.asarray(params["auto_loc"]), tril @ tril.T, *map(np.asarray, (x, y)))


@pytest.mark.slow  # 17-42 s on the 2-core CI machine: the default suite keeps its budget
def test_partly_bayesian_flax_network_on_digits():
    """A Flax MLP with priors on its last layer only (NumPyro's random_flax_module with
    a partial prior dict): the body is a model param learned jointly (variational EM)."""
    flax_linen = pytest.importorskip("flax.linen", reason="flax is not installed")
    from numpyro.contrib.module import random_flax_module
    from numpyro.infer import Predictive
    from numpyro.infer.autoguide import AutoNormal

    from psvi.contrib.datasets import load_digits
    from psvi.metrics import classification_report

    class MLP(flax_linen.Module):
        @flax_linen.compact
        def __call__(self, x):
            return flax_linen.Dense(10)(flax_linen.tanh(flax_linen.Dense(50)(x)))

    data = load_digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    head_prior = {"Dense_1.kernel": ndist.Normal(0.0, 1.0), "Dense_1.bias": ndist.Normal(0.0, 1.0)}

    def model(x, y=None, subsample_size=None):
        net = random_flax_module("mlp", MLP(), prior=head_prior, input_shape=(1, x.shape[1]))
        with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            logits = net(x[idx])
            numpyro.deterministic("probs", jax.nn.softmax(logits))
            numpyro.sample("y", ndist.Categorical(logits=logits), obs=None if y is None else y[idx])

    train = lambda x, y: model(x, y, subsample_size=64)  # noqa: E731
    guide = AutoNormal(train, init_scale=0.01)
    svi = numpyro_psvi.ProximalScoreVI(train, guide, numpyro.optim.Adam(1e-3), inner_steps=5)
    state = svi.init(jax.random.PRNGKey(0), x, y)
    body_before = svi.get_params(state)["mlp$params"]["Dense_0"]["kernel"]
    result = svi.run(None, 1500, x, y, progress_bar=False, init_state=state)
    assert int(result.state.num_rejected) == 0
    assert not np.allclose(result.params["mlp$params"]["Dense_0"]["kernel"], body_before)
    predictive = Predictive(model, guide=guide, params=result.params, num_samples=50, return_sites=["probs"])
    probs = predictive(jax.random.PRNGKey(1), jnp.asarray(data.x_test))["probs"]
    report = classification_report(np.asarray(probs), data.y_test)
    # log 10 = 2.3 is a uniform guess; 6,000 score calls must get far below it.
    assert report["nll"] < 0.5 and report["accuracy"] > 0.85
