"""Pyro ProximalScoreVI on several processes with torch.distributed.

A Bayesian linear regression (N = 4000 data points, 5 weights, known noise) with
mini-batches from the model's own plate, fitted on one process or on several::

    python examples/pyro_data_parallel.py
    torchrun --standalone --nproc_per_node=2 examples/pyro_data_parallel.py

Under ``torchrun`` every rank runs this same script: it initializes the process group,
seeds every rank alike, and the engine splits each global batch of ``ranks * 100``
points over the ranks (``subsample_size`` is one rank's batch, as a ``DataLoader``'s
``batch_size`` under DDP). Rank 0 prints the fitted posterior against the exact one
(means and sds) and writes nothing else; every rank holds the same guide.
"""

from __future__ import annotations

import argparse
import os

import pyro
import pyro.distributions as dist
import torch
import torch.distributed
from pyro.infer.autoguide import AutoNormal

from pyro_psvi import ProximalScoreVI

NUM_DATA, DIM, NOISE, PRIOR_SCALE, BATCH_PER_RANK = 4000, 5, 1.0, 1.0, 100


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_DATA, DIM, generator=generator)
    y = x @ torch.linspace(-1.0, 1.0, DIM) + NOISE * torch.randn(NUM_DATA, generator=generator)
    return x, y


def model(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros(DIM), PRIOR_SCALE).to_event(1))
    with pyro.plate("data", len(x), subsample_size=BATCH_PER_RANK) as index:
        pyro.sample("y", dist.Normal((x[index] * w).sum(-1), NOISE), obs=y[index])


def exact_posterior(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The conjugate posterior's means and marginal sds."""
    precision = x.T @ x / NOISE**2 + torch.eye(DIM) / PRIOR_SCALE**2
    covariance = torch.linalg.inv(precision)
    return covariance @ x.T @ y / NOISE**2, covariance.diagonal().sqrt()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    options = parser.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        torch.distributed.init_process_group("gloo")
    ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    pyro.set_rng_seed(0)  # the same seed on every rank: the same particles and batches
    x, y = make_data()
    guide = AutoNormal(model)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 0.01}))  # data parallel under torchrun
    svi.run(options.steps, x, y)
    if rank == 0:
        mean, sd = exact_posterior(x, y)
        fitted_mean = guide.median()["w"].detach()
        fitted_sd = pyro.param("AutoNormal.scales.w").detach()
        print(
            f"ranks {ranks}, global batch {ranks * BATCH_PER_RANK}, data parallel {svi.reducer is not None}"
        )
        print(f"exact means {mean.numpy().round(4)}")
        print(f"ProximalScoreVI means {fitted_mean.numpy().round(4)}")
        print(f"exact sds {sd.numpy().round(4)}")
        print(f"ProximalScoreVI sds {fitted_sd.numpy().round(4)}")
        print(f"mean error in sds {((fitted_mean - mean).abs() / sd).max():.3f}, sd ratio "
              f"{(fitted_sd / sd).min():.3f} .. {(fitted_sd / sd).max():.3f}")  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
