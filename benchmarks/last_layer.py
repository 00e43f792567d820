"""Bayesian last layer on a jointly trained body: digits MLP 64-50-10 (NumPyro).

The body (first layer) is a model param (``numpyro.param``), the last layer has
N(0, 1) priors. ProximalScoreVI learns the body by variational EM and the last
layer's posterior (AutoNormal); SVI/Trace_ELBO fits both with the same guide; MAP is
SVI with AutoDelta on the last layer. Same optimizer (Adam 1e-3), same mini-batches
(64), same score calls; test accuracy, NLL and ECE of the predictive.

    python -m benchmarks.last_layer [--calls 20000]
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoNormal
from numpyro.infer.initialization import init_to_value

from benchmarks.common import save
from numpyro_psvi import ProximalScoreVI
from numpyro_psvi.contrib.models import mlp_init_values
from psvi.contrib.datasets import load_digits
from psvi.metrics import classification_report

PARTICLES = 4


def last_layer_model(x, y=None, *, subsample_size=None, hidden=50, num_classes=10):
    init = mlp_init_values(x.shape[1], hidden, num_classes)
    w1 = numpyro.param("w1", init["w1"])
    b1 = numpyro.param("b1", init["b1"])
    w2 = numpyro.sample("w2", dist.Normal(jnp.zeros((hidden, num_classes)), 1.0).to_event(2))
    b2 = numpyro.sample("b2", dist.Normal(jnp.zeros(num_classes), 1.0).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        logits = jnp.tanh(x[idx] @ w1 + b1) @ w2 + b2
        numpyro.deterministic("probs", jax.nn.softmax(logits))
        numpyro.sample("y", dist.Categorical(logits=logits), obs=None if y is None else y[idx])


def fit(method: str, calls: int, seed: int = 0) -> dict:
    data = load_digits()
    x, y, x_test = jnp.asarray(data.x_train), jnp.asarray(data.y_train), jnp.asarray(data.x_test)
    model = partial(last_layer_model, subsample_size=64)
    init = init_to_value(values=mlp_init_values(x.shape[1]))
    optim = numpyro.optim.Adam(1e-3)
    if method == "map":
        guide = AutoDelta(model, init_loc_fn=init)
        engine = SVI(model, guide, optim, Trace_ELBO())
        num_updates = calls  # one score call per step (a point mass)
    elif method == "advi":
        guide = AutoNormal(model, init_loc_fn=init, init_scale=0.01)
        engine = SVI(model, guide, optim, Trace_ELBO(PARTICLES))
        num_updates = calls // PARTICLES
    else:
        guide = AutoNormal(model, init_loc_fn=init, init_scale=0.01)
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=5)
        num_updates = calls // PARTICLES
    start = time.perf_counter()
    result = engine.run(jax.random.PRNGKey(seed), num_updates, x, y, progress_bar=False)
    seconds = time.perf_counter() - start
    predictive = Predictive(
        last_layer_model, guide=guide, params=result.params, num_samples=200, return_sites=["probs"]
    )
    probs = np.asarray(predictive(jax.random.PRNGKey(seed + 1), x_test)["probs"])
    return {**classification_report(probs, np.asarray(data.y_test)), "seconds": seconds}


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    results = {}
    print("| method | accuracy | NLL | ECE | seconds |\n| --- | --- | --- | --- | --- |")
    for method in ("psvi", "advi", "map"):
        r = results[method] = fit(method, args.calls)
        print(f"| {method} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['seconds']:.1f} |")
    print("wrote", save("last_layer", {"calls": args.calls, "particles": PARTICLES, "results": results}))


if __name__ == "__main__":
    main()
