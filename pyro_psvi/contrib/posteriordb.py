"""Pyro translations of the shared PosteriorDB models (twins of
``numpyro_psvi.contrib.posteriordb``; the same sites, densities and conventions)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints


def _tensor(value) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value, np.float32))


def eight_schools_noncentered(data: dict) -> None:
    y, sigma = _tensor(data["y"]), _tensor(data["sigma"])
    theta_trans = pyro.sample("theta_trans", dist.Normal(torch.zeros(len(y)), 1.0).to_event(1))
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    theta = pyro.deterministic("theta", theta_trans * tau.unsqueeze(-1) + mu.unsqueeze(-1))
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def eight_schools_centered(data: dict) -> None:
    y, sigma = _tensor(data["y"]), _tensor(data["sigma"])
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    theta_prior = dist.Normal(mu.unsqueeze(-1), tau.unsqueeze(-1)).expand(mu.shape + (len(y),))
    theta = pyro.sample("theta", theta_prior.to_event(1))
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def ar_k(data: dict) -> None:
    k, y = int(data["K"]), _tensor(data["y"])
    lags = torch.stack([y[k - j : len(y) - j] for j in range(1, k + 1)], dim=-1)  # y[t - j]
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(k), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = alpha.unsqueeze(-1) + (lags * beta.unsqueeze(-2)).sum(-1)
    pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y[k:])


def diamonds(data: dict) -> None:
    x = np.asarray(data["X"], np.float64)[:, 1:]
    xc = torch.as_tensor((x - x.mean(0)).astype(np.float32))
    y = _tensor(data["Y"])
    b = pyro.sample("b", dist.Normal(torch.zeros(xc.shape[1]), 1.0).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    pyro.factor("sigma_prior", dist.StudentT(3.0, 0.0, 10.0).log_prob(sigma))
    mean = intercept.unsqueeze(-1) + (xc * b.unsqueeze(-2)).sum(-1)
    pyro.sample("Y", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y)


def low_dim_gauss_mix(data: dict) -> None:
    y = _tensor(data["y"])
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum(-1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0)).unsqueeze(-1)
    components = torch.stack(
        [torch.log(theta) + dist.Normal(mu[..., 0:1], sigma[..., 0:1]).log_prob(y),
         torch.log1p(-theta) + dist.Normal(mu[..., 1:2], sigma[..., 1:2]).log_prob(y)]
    )  # fmt: skip
    pyro.factor("y", torch.logsumexp(components, dim=0).sum(-1))


MODELS: dict[str, Callable[[dict], None]] = {
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "eight_schools-eight_schools_centered": eight_schools_centered,
    "arK-arK": ar_k,
    "diamonds-diamonds": diamonds,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
}
