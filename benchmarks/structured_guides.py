"""Pyro's structured Gaussian guides, AutoGaussian (dense) and AutoStructured, on a
Gaussian hierarchy whose posterior is in both families: ProximalScoreVI against SVI.

``mu ~ N(0, 5^2)``, ``theta_j ~ N(mu, 1)``, ``y_j ~ N(theta_j, 1)`` for ``j < J`` (J = 100
by default, so D = 101; ``y`` drawn once from a fixed seed). Each guide from its own
initialisation, Adam(0.01), four particles for every method (SVI: ``Trace_ELBO(4)``);
the engine at its defaults and with ``inner_steps=5``. At each checkpoint, from 20,000
draws of the guide, the largest error of a marginal mean in posterior sds and the
largest relative error of a marginal sd. Then the time per step (interleaved blocks of
20 steps after 10, one torch thread; medians).

    python -m benchmarks.structured_guides [--groups 100] [--updates 600] [--tag _name]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoGaussian, AutoStructured

from benchmarks.common import save
from pyro_psvi import ProximalScoreVI
from pyro_psvi.guides import guide_density

GUIDES = {"AutoGaussian": AutoGaussian, "AutoStructured": AutoStructured}
METHODS = ("SVI", "ProximalScoreVI", "ProximalScoreVI, inner_steps=5")


def hierarchy(groups: int):
    """The model and its exact posterior mean and covariance over ``(mu, theta)``."""
    y = torch.randn(groups, generator=torch.Generator().manual_seed(0)) + 1.0

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("j", groups):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    precision = torch.zeros(groups + 1, groups + 1, dtype=torch.float64)
    precision[0, 0] = 1 / 25 + groups
    precision[0, 1:] = precision[1:, 0] = -1.0
    precision[1:, 1:] = 2 * torch.eye(groups, dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    return model, cov @ torch.cat([torch.zeros(1, dtype=torch.float64), y.double()]), cov


def build(model, guide_name: str, method: str):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = GUIDES[guide_name](model)
    optim = pyro.optim.Adam({"lr": 1e-2})
    if method == "SVI":
        return guide, SVI(model, guide, optim, Trace_ELBO(num_particles=4))
    options = {"inner_steps": 5} if method.endswith("inner_steps=5") else {}
    return guide, ProximalScoreVI(model, guide, optim, **options)


def errors(guide, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    density = guide_density(guide)
    params = {name: pyro.param(name).detach() for name in density.param_names}
    draws = density.sample(params, 20_000).double()
    sd = cov.diagonal().sqrt()
    mean_error = ((draws.mean(0) - mean).abs() / sd).max()
    return float(mean_error), float((draws.std(0) / sd - 1).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--updates", type=int, default=600)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, mean, cov = hierarchy(args.groups)
    checkpoints = sorted({args.updates // 4, args.updates // 2, args.updates})
    rows = []
    for guide_name in GUIDES:
        for method in METHODS:
            guide, engine = build(model, guide_name, method)
            trace = []
            for update in range(1, args.updates + 1):
                engine.step()
                if update in checkpoints:
                    mean_error, sd_error = errors(guide, mean, cov)
                    trace.append({"updates": update, "mean_error_sds": mean_error, "sd_error": sd_error})
            rows.append({"guide": guide_name, "method": method, "checkpoints": trace})
            print(guide_name, method, trace, flush=True)
    timings = {(g, m): [] for g in GUIDES for m in METHODS}
    for _ in range(args.blocks):
        for guide_name, method in timings:
            _, engine = build(model, guide_name, method)
            for _ in range(10):
                engine.step()
            start = time.perf_counter()
            for _ in range(20):
                engine.step()
            timings[guide_name, method].append((time.perf_counter() - start) / 20 * 1e3)
    for row in rows:
        row["step_ms"] = statistics.median(timings[row["guide"], row["method"]])
        svi = statistics.median(timings[row["guide"], "SVI"])
        row["step_over_svi"] = row["step_ms"] / svi
        print(row["guide"], row["method"], f"{row['step_ms']:.1f} ms, {row['step_over_svi']:.2f}x SVI")
    save(f"structured_guides{args.tag}", {"groups": args.groups, "updates": args.updates, "rows": rows})


if __name__ == "__main__":
    main()
