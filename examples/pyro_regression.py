"""Bayesian regression with a PyroModule, as in Pyro's tutorial, fitted with SVI and
with ProximalScoreVI; exact posterior for comparison.

The model of Pyro's "Bayesian Regression" tutorial (a ``PyroModule[nn.Linear]`` with
``PyroSample`` priors) on synthetic data with a known noise scale, so that the exact
posterior of the weights is Gaussian in closed form. Params are module-local
(``pyro.settings.set(module_local_params=True)``, as Pyro's ``examples/svi_torch.py``
recommends); the guide is ``AutoNormal`` (Pyro's own ``SVI.step`` fails in this mode
with AutoMultivariateNormal, whose plain ``nn.Parameter``s lack ``.unconstrained``;
ProximalScoreVI takes either); both engines take the same steps with the user's
``Adam(0.03)``. Prints each fit's means and sds against the exact posterior means and
the exact mean-field sds (``1 / sqrt(diag(precision))``, what a mean-field guide's
optimum has).

    python examples/pyro_regression.py [--steps 800]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample

from psvi.contrib.targets import conjugate_linear_regression
from pyro_psvi import ProximalScoreVI

NOISE, PRIOR = 0.5, 1.0


class BayesianRegression(PyroModule):
    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](in_features, 1, bias=False)
        self.linear.weight = PyroSample(dist.Normal(0.0, PRIOR).expand([1, in_features]).to_event(2))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, NOISE), obs=y)
        return mean


def _fmt(values: np.ndarray) -> str:
    return np.array2string(np.asarray(values), precision=3, suppress_small=True, floatmode="fixed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    pyro.settings.set(module_local_params=True)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=generator)
    y = x @ torch.tensor([1.5, -0.5, 0.0, 2.0]) + NOISE * torch.randn(200, generator=generator)
    mean, cov = conjugate_linear_regression(x.numpy(), y.numpy(), prior_scale=PRIOR, noise_scale=NOISE)
    mean_field_sds = 1 / np.sqrt(np.diag(np.linalg.inv(cov)))
    print(f"{'exact':16s} means {_fmt(mean)}  sds {_fmt(mean_field_sds)} (mean field)")

    for name in ("SVI", "ProximalScoreVI"):
        pyro.set_rng_seed(1)
        model = BayesianRegression(4)
        guide = AutoNormal(model)
        optim = pyro.optim.Adam({"lr": 0.03})
        # nn.Linear is not broadcast-safe over a particle dimension: one model call per
        # particle in both engines.
        if name == "SVI":
            engine = SVI(model, guide, optim, Trace_ELBO(num_particles=4))
        else:  # the same call, the ELBO object left out
            engine = ProximalScoreVI(model, guide, optim, num_particles=4, vectorize_particles=False)
        for _ in range(args.steps):
            loss = engine.step(x, y)
        with torch.no_grad():
            loc, scale = (part.linear.weight.reshape(-1).numpy() for part in (guide.locs, guide.scales))
        print(f"{name:16s} means {_fmt(loc)}  sds {_fmt(scale)}  last -ELBO {loss:.1f}")
    predictive = Predictive(model, guide=guide, num_samples=200, return_sites=["_RETURN"])
    rows = predictive(x[:3])["_RETURN"].mean(0).numpy()
    print(
        f"ProximalScoreVI posterior predictive means of rows 0-2: {_fmt(rows)}; data: {_fmt(y[:3].numpy())}"
    )


if __name__ == "__main__":
    main()
