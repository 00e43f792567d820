"""Where the MNIST guides go (companion to ``benchmarks/mnist.py``): the median
first-layer posterior sd of ProximalScoreVI's and ADVI's AutoNormal guides, and the
test NLL, against steps, on 1k training images with the settings of
``benchmarks/mnist.py`` (and ProximalScoreVI without its trust region).

    python -m benchmarks.mnist_scales [--steps N]

writes ``benchmarks/results/mnist_scales.json``.
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import Predictive
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_value

from benchmarks.common import make_engine, save
from benchmarks.mnist import BATCH, HIDDEN, LEARNING_RATE, NUM_PARTICLES
from numpyro_psvi.contrib.models import mlp_classifier, mlp_init_values
from psvi.contrib.datasets import load_mnist
from psvi.metrics import nll, predictive_probs


def trajectory(method: str, steps: int, every: int, **options) -> list[dict]:
    data = load_mnist(num_train=1000, seed=0)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test[:2000]), np.asarray(data.y_test[:2000])
    model = partial(mlp_classifier, hidden=HIDDEN, subsample_size=BATCH)
    init = mlp_init_values(x.shape[1], hidden=HIDDEN, seed=0)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
    engine = make_engine(method, model, guide, LEARNING_RATE, NUM_PARTICLES, **options)
    state = engine.init(jax.random.PRNGKey(0), x, y)
    update = jax.jit(engine.update)
    points = []
    for step in range(1, steps + 1):
        state, _ = update(state, x, y)
        if step % every == 0:
            params = engine.get_params(state)
            full = partial(mlp_classifier, hidden=HIDDEN)
            predictive = Predictive(full, guide=guide, params=params, num_samples=30, return_sites=["probs"])
            probs = predictive_probs(np.asarray(predictive(jax.random.PRNGKey(1), x_test)["probs"]))
            points.append({"step": step, "w1_sd_median": float(np.median(params["w1_auto_scale"])),
                           "test_nll": nll(probs, y_test)})  # fmt: skip
            print(method, options, points[-1], flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    options = parser.parse_args()
    every = max(options.steps // 15, 1)
    payload = {
        "psvi": trajectory("psvi", options.steps, every),
        "psvi_no_trust_region": trajectory("psvi", options.steps // 3, every, trust_region=None),
        "advi": trajectory("advi", options.steps, every),
    }
    print(f"wrote {save('mnist_scales', payload)}")


if __name__ == "__main__":
    main()
