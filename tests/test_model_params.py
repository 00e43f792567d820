"""Model parameters learned jointly (variational EM), both backends.

Regression with a learned noise scale ``sigma`` (a model param) and a conjugate
N(0, 1) prior on the weights: the EM fixed point is the type-II maximum-likelihood
``sigma`` (the gradient of E_q[log p_sigma] is the evidence's gradient when q is the
exact posterior), and the weight posterior is the closed form at that ``sigma``.
"""

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
from numpyro.infer.autoguide import AutoMultivariateNormal as NAutoMVN
from numpyro.infer.initialization import init_to_value as n_init_to_value
from pyro.infer.autoguide import AutoMultivariateNormal as PAutoMVN
from pyro.infer.autoguide import init_to_value as p_init_to_value
from scipy import optimize, stats

import numpyro_psvi
import pyro_psvi
from psvi.targets import conjugate_linear_regression

N, D = 100, 3
UPDATES = 1500


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    return x, (x @ np.array([1.0, -2.0, 0.5]) + 0.7 * rng.normal(size=N)).astype(np.float32)


def type2_ml_sigma(x, y) -> float:
    def neg_log_evidence(log_sigma):
        cov = x @ x.T + np.exp(2 * log_sigma) * np.eye(N)
        return -stats.multivariate_normal.logpdf(y, np.zeros(N), cov)

    return float(np.exp(optimize.minimize_scalar(neg_log_evidence, bounds=(-3, 2), method="bounded").x))


def check(sigmas, loc, cov, x, y):
    """``sigmas``: the learned scale over the updates; ``loc, cov``: the final guide."""
    sigma = float(np.mean(sigmas[UPDATES // 2 :]))
    # The averaged iterates' standard error is <= 0.002 here (sd <= 0.008 over 750
    # autocorrelated updates, >= 20 effective): 5 of them, rounded up, is 0.01, a fifth
    # of sigma's own statistical uncertainty (sigma / sqrt(2 N) = 0.045).
    assert sigma == pytest.approx(type2_ml_sigma(x, y), abs=0.01)
    exact_mean, exact_cov = conjugate_linear_regression(x, y, prior_scale=1.0, noise_scale=sigma)
    sd = np.sqrt(np.diag(exact_cov))
    assert np.all(np.abs(loc - exact_mean) < 0.1 * sd)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), sd, rtol=0.05)


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
    check(np.asarray(sigmas), posterior.loc.detach().double().numpy(),
          posterior.covariance_matrix.detach().double().numpy(), x, y)


def test_partly_bayesian_flax_network_on_digits():
    """A Flax MLP with priors on its last layer only (NumPyro's random_flax_module with
    a partial prior dict): the body is a model param learned jointly (variational EM)."""
    flax_linen = pytest.importorskip("flax.linen", reason="flax is not installed")
    from numpyro.contrib.module import random_flax_module
    from numpyro.infer import Predictive
    from numpyro.infer.autoguide import AutoNormal

    from psvi.datasets import load_digits
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
    predictive = Predictive(model, guide=guide, params=result.params, num_samples=50,
                            return_sites=["probs"])
    probs = predictive(jax.random.PRNGKey(1), jnp.asarray(data.x_test))["probs"]
    report = classification_report(np.asarray(probs), data.y_test)
    # log 10 = 2.3 is a uniform guess; 6,000 score calls must get far below it.
    assert report["nll"] < 0.5 and report["accuracy"] > 0.85
