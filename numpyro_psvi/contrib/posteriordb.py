"""NumPyro translations of the shared PosteriorDB models (``psvi.contrib.posteriordb``).

Each is written from the Stan code so that its log density matches Stan's up to a
constant: ``<lower=0>`` parameters with a symmetric prior become half-distributions
(or an improper uniform plus the Stan density, where no half-distribution exists),
``ordered[2]`` an improper uniform on ordered vectors plus the prior as a factor.
Stan's transformed parameters are ``numpyro.deterministic`` sites, so draws carry
every name of the reference summary.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints


def eight_schools_noncentered(data: dict) -> None:
    y, sigma = jnp.asarray(data["y"], jnp.float32), jnp.asarray(data["sigma"], jnp.float32)
    theta_trans = numpyro.sample("theta_trans", dist.Normal(jnp.zeros(len(y)), 1.0).to_event(1))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta = numpyro.deterministic("theta", theta_trans * tau + mu)
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def eight_schools_centered(data: dict) -> None:
    y, sigma = jnp.asarray(data["y"], jnp.float32), jnp.asarray(data["sigma"], jnp.float32)
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    theta = numpyro.sample("theta", dist.Normal(mu, tau).expand([len(y)]).to_event(1))
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def ar_k(data: dict) -> None:
    k, y = int(data["K"]), jnp.asarray(data["y"], jnp.float32)
    lags = jnp.stack([y[k - j : len(y) - j] for j in range(1, k + 1)], axis=-1)  # y[t - j]
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(k), 10.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    numpyro.sample("y", dist.Normal(alpha + lags @ beta, sigma).to_event(1), obs=y[k:])


def diamonds(data: dict) -> None:
    x = np.asarray(data["X"], np.float64)[:, 1:]
    xc = jnp.asarray(x - x.mean(0), jnp.float32)
    y = jnp.asarray(data["Y"], jnp.float32)
    b = numpyro.sample("b", dist.Normal(jnp.zeros(xc.shape[1]), 1.0).to_event(1))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    numpyro.factor("sigma_prior", dist.StudentT(3.0, 0.0, 10.0).log_prob(sigma))
    numpyro.sample("Y", dist.Normal(intercept + xc @ b, sigma).to_event(1), obs=y)


def low_dim_gauss_mix(data: dict) -> None:
    y = jnp.asarray(data["y"], jnp.float32)
    mu = numpyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    components = jnp.stack(
        [jnp.log(theta) + dist.Normal(mu[..., 0:1], sigma[..., 0:1]).log_prob(y),
         jnp.log1p(-theta) + dist.Normal(mu[..., 1:2], sigma[..., 1:2]).log_prob(y)]
    )  # fmt: skip
    numpyro.factor("y", logsumexp(components, axis=0).sum(-1))


MODELS: dict[str, Callable[[dict], None]] = {
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "eight_schools-eight_schools_centered": eight_schools_centered,
    "arK-arK": ar_k,
    "diamonds-diamonds": diamonds,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
}
