"""Step cost of flow guides against a Gaussian guide, by latent dimension (both backends).

The density of an inverse autoregressive flow (AutoIAFNormal) at a given point needs
``D`` sequential passes of its network (the flow's inverse), at every inner step; a
coupling flow inverts in one pass. This measures seconds per ``ProximalScoreVI`` step
(the defaults: S=4; K=20 for AutoMultivariateNormal, at most five stopped steps for a
flow) on a standard-normal target of dimension ``D``, for
AutoMultivariateNormal, AutoIAFNormal (both backends) and an affine-coupling
AutoNormalizingFlow (Pyro; NumPyro has no coupling-flow autoguide), all on one machine
in one run. ``python -m benchmarks.flow_cost [--quick]`` writes
``benchmarks/results/flow_cost.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as ndist
import optax
import pyro
import pyro.distributions as pdist
import torch
from numpyro.infer.autoguide import AutoIAFNormal as NAutoIAFNormal
from numpyro.infer.autoguide import AutoMultivariateNormal as NAutoMVN
from pyro.distributions.transforms import ComposeTransformModule, affine_coupling, permute
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormalizingFlow

import numpyro_psvi
import pyro_psvi
from benchmarks.common import save


def hidden(dim: int) -> int:
    """Hidden width of the flows' networks (Pyro's autoregressive nets need >= D)."""
    return max(32, 2 * dim)


def pyro_guide(kind: str, model, dim: int):
    if kind == "mvn":
        return AutoMultivariateNormal(model)
    if kind == "iaf":
        return AutoIAFNormal(model, hidden_dim=[hidden(dim)], num_transforms=2)

    def coupling(dim):
        flip = permute(dim, torch.flip(torch.arange(dim), [0]))
        layers = [(affine_coupling(dim, hidden_dims=[hidden(dim)]), flip) for _ in range(2)]
        return ComposeTransformModule([t for layer in layers for t in layer])

    return AutoNormalizingFlow(model, coupling)


def pyro_seconds_per_step(kind: str, dim: int, steps: int) -> float:
    def model():
        pyro.sample("x", pdist.Normal(torch.zeros(dim), 1.0).to_event(1))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = pyro_psvi.ProximalScoreVI(model, pyro_guide(kind, model, dim), pyro.optim.Adam({"lr": 1e-2}))
    svi.step()  # set-up
    start = time.perf_counter()
    svi.run(steps)
    return (time.perf_counter() - start) / steps


def numpyro_seconds_per_step(kind: str, dim: int, steps: int) -> float:
    def model():
        numpyro.sample("x", ndist.Normal(jnp.zeros(dim), 1.0).to_event(1))

    guide = (
        NAutoMVN(model) if kind == "mvn" else NAutoIAFNormal(model, hidden_dims=[hidden(dim)], num_flows=2)
    )
    svi = numpyro_psvi.ProximalScoreVI(model, guide, optax.adam(1e-2))
    state = svi.init(jax.random.PRNGKey(0))
    update = jax.jit(svi.update)
    state, loss = update(state)  # compile
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        state, loss = update(state)
    loss.block_until_ready()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D in (4, 16), 3 steps each")
    options = parser.parse_args()
    dims = (4, 16) if options.quick else (4, 16, 64)
    steps = 3 if options.quick else 10
    rows = []
    for dim in dims:
        for backend, kinds, measure in (
            ("pyro", ("mvn", "iaf", "coupling"), pyro_seconds_per_step),
            ("numpyro", ("mvn", "iaf"), numpyro_seconds_per_step),
        ):
            for kind in kinds:
                seconds = measure(kind, dim, steps)
                rows.append({"backend": backend, "guide": kind, "dim": dim, "seconds_per_step": seconds})
                print(f"{backend:8s} {kind:9s} D={dim:3d}: {1e3 * seconds:9.1f} ms/step", flush=True)
    name = "flow_cost_quick" if options.quick else "flow_cost"
    path = save(name, {"steps": steps, "rows": rows})
    print(f"wrote {path}")
    print("\n| backend | guide | " + " | ".join(f"D={d}" for d in dims) + " |")
    print("|---|---|" + "---|" * len(dims))
    for backend, kind in sorted({(r["backend"], r["guide"]) for r in rows}):
        times = {
            r["dim"]: r["seconds_per_step"] for r in rows if (r["backend"], r["guide"]) == (backend, kind)
        }
        print(f"| {backend} | {kind} | " + " | ".join(f"{1e3 * times[d]:.0f} ms" for d in dims) + " |")


if __name__ == "__main__":
    main()
