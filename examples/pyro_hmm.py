"""A hidden Markov model in Pyro, its states summed out: ProximalScoreVI beside SVI.

Twenty sequences of 25 steps from a two-state chain with Normal emissions; the states
are discrete latents in a ``pyro.markov`` loop, marked for parallel enumeration as
``TraceEnum_ELBO`` needs them, and ProximalScoreVI sums them out of its scores the same
way, so the guide (AutoNormal, the states hidden from it) fits the emission locations
and the transition probabilities. After the fit, ``infer_discrete`` decodes the most
likely states given the fitted parameters, as after SVI.

    python examples/pyro_hmm.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate, infer_discrete
from pyro.infer.autoguide import AutoNormal
from pyro.ops.indexing import Vindex

from pyro_psvi import ProximalScoreVI

SEQUENCES, STEPS, STAY = 20, 25, 0.9
LOCS = torch.tensor([-1.0, 2.0])


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """``(observations, states)``, each ``(STEPS, SEQUENCES)``."""
    generator = torch.Generator().manual_seed(0)
    states = torch.zeros(STEPS, SEQUENCES, dtype=torch.long)
    for t in range(1, STEPS):
        move = torch.rand(SEQUENCES, generator=generator) > STAY
        states[t] = torch.where(move, 1 - states[t - 1], states[t - 1])
    return LOCS[states] + torch.randn(STEPS, SEQUENCES, generator=generator), states


@config_enumerate
def hmm(y: torch.Tensor) -> None:
    # Ordered locations: one labelling of the states, so the posterior has one mode.
    locs = pyro.sample(
        "locs",
        dist.TransformedDistribution(
            dist.Normal(0.0, 5.0).expand([2]).to_event(1), dist.transforms.OrderedTransform()
        ),
    )
    stay = pyro.sample("stay", dist.Beta(2.0, 2.0).expand([2]).to_event(1))
    to_one = torch.stack([1 - stay[..., 0], stay[..., 1]], -1)  # P(x_t = 1 | x_{t-1})
    with pyro.plate("sequences", y.shape[1], dim=-1):
        x = None
        for t in pyro.markov(range(y.shape[0])):
            probs = torch.tensor(0.5) if x is None else Vindex(to_one)[..., x]
            x = pyro.sample(f"x_{t}", dist.Bernoulli(probs)).long()
            pyro.sample(f"y_{t}", dist.Normal(Vindex(locs)[..., x], 1.0), obs=y[t])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    y, states = data()
    hidden = [f"x_{t}" for t in range(STEPS)]
    for name in ("ProximalScoreVI", "SVI(TraceEnum_ELBO)"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormal(poutine.block(hmm, hide=hidden))
        optim = pyro.optim.Adam({"lr": 1e-2})
        if name == "ProximalScoreVI":
            engine = ProximalScoreVI(hmm, guide, optim)
        else:
            elbo = TraceEnum_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
            engine = SVI(hmm, guide, optim, elbo)
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step(y)
        seconds = time.perf_counter() - start
        median = guide.median()
        locs, stay = median["locs"].numpy().round(3), median["stay"].numpy().round(3)
        print(f"{name}: locs {locs} stay {stay} ({seconds:.0f} s)")
        # The most likely states given the guide's median parameters (Viterbi-like).
        fixed = poutine.condition(hmm, data=median)
        decoded = poutine.trace(infer_discrete(fixed, first_available_dim=-2, temperature=0)).get_trace(y)
        guessed = torch.stack([decoded.nodes[f"x_{t}"]["value"].long() for t in range(STEPS)])
        print(f"{name}: decoded states matching the true ones {(guessed == states).float().mean():.3f}")


if __name__ == "__main__":
    main()
