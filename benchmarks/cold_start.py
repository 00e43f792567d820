"""A NumPyro fit's first ``run`` in a fresh process: ProximalScoreVI against SVI(Trace_ELBO).

What a user meets on swapping the engine in a script: set-up, compilation and the updates
of ``run(key, steps, ...)``, timed from the call's start to its params being ready, each
in its own Python process (so no compiled program is reused), the methods alternating.
Two small models: eight schools (centered; AutoNormal) and a logistic regression (500
rows, 5 features; AutoMultivariateNormal). Adam(0.01), SVI with ``Trace_ELBO(4)``, the
engine with its defaults (4 particles). Medians, and the ratio to SVI's.

    python -m benchmarks.cold_start [--repeats 3] [--steps 1000] [--tag _name]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from benchmarks.common import save

MODELS = ("eight schools", "logistic regression")
METHODS = ("SVI", "ProximalScoreVI")

_SCRIPT = """
import sys, time
import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
import numpyro_psvi

model_name, method, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if model_name == "eight schools":
    y = jnp.array([28.0, 8, -3, 7, -1, 1, 18, 12])
    sigma = jnp.array([15.0, 10, 16, 11, 9, 11, 10, 18])

    def model(sigma, y):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        tau = numpyro.sample("tau", dist.HalfCauchy(5))
        with numpyro.plate("J", 8):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
            numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    args, guide = (sigma, y), AutoNormal(model)
else:
    x = jax.random.normal(jax.random.PRNGKey(1), (500, 5))
    labels = (x @ jnp.array([1.0, -0.5, 0.25, 0.0, 2.0]) > 0).astype(jnp.float32)

    def model(x, labels):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(5), 1.0).to_event(1))
        with numpyro.plate("N", 500):
            numpyro.sample("obs", dist.Bernoulli(logits=x @ w), obs=labels)

    args, guide = (x, labels), AutoMultivariateNormal(model)
optim = numpyro.optim.Adam(0.01)
if method == "SVI":
    engine = SVI(model, guide, optim, Trace_ELBO(num_particles=4))
else:
    engine = numpyro_psvi.ProximalScoreVI(model, guide, optim)
start = time.perf_counter()
result = engine.run(jax.random.PRNGKey(0), steps, *args, progress_bar=False)
jax.block_until_ready(result.params)
print(time.perf_counter() - start)
"""


def first_run_seconds(model: str, method: str, steps: int) -> float:
    """Seconds of ``method``'s first ``run`` on ``model`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, model, method, str(steps)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tag", default="", help="a suffix to the JSON's name in benchmarks/results")
    args = parser.parse_args()
    rows = []
    for model in MODELS:
        seconds: dict[str, list[float]] = {method: [] for method in METHODS}
        for _ in range(args.repeats):
            for method in METHODS:
                seconds[method].append(first_run_seconds(model, method, args.steps))
        svi = statistics.median(seconds["SVI"])
        for method in METHODS:
            median = statistics.median(seconds[method])
            rows.append({"model": model, "method": method, "seconds": seconds[method], "median": median,
                         "ratio": median / svi})  # fmt: skip
            print(f"{model:20s} {method:16s} {median:6.2f} s  {median / svi:5.2f}x  {seconds[method]}")
    save(f"cold_start{args.tag}", {"steps": args.steps, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
