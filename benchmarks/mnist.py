"""MNIST BNN (the paper's Figure 3): ProximalScoreVI vs ADVI against training-set size.

A Bayesian MLP (784-100-10, tanh, N(0, 1) priors, ``numpyro_psvi.models.mlp_classifier``)
on seeded random subsets of 1k, 5k, 20k and all 60k training images of the real MNIST
(``psvi.datasets.load_mnist``, local file), evaluated on the full 10k test set. Both
methods fit the same AutoNormal guide (Glorot-uniform means, scale 0.01) with the same
particles (S=4), optimizer (Adam 1e-3), mini-batches of 128 through the model's
subsampled plate and budget (the same number of steps, S score calls each);
ProximalScoreVI with its defaults (K=20), ADVI the PPL's SVI with Trace_ELBO(S).
Metrics from 100 guide draws: test accuracy, NLL and ECE (15 bins) of the posterior
predictive, reliability bins, and test NLL against score calls (on 2k test images, 30
draws). NumPyro backend, CPU.

    python -m benchmarks.mnist [--quick] [--sizes 1000 5000 ...] [--steps N]

writes ``benchmarks/results/mnist.json`` and, without ``--quick``, the PNGs and the
table printed for ``docs/mnist.md``.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import Predictive
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_value
from tqdm import tqdm

from benchmarks.common import make_engine, save
from numpyro_psvi.models import mlp_classifier, mlp_init_values
from psvi.datasets import load_mnist
from psvi.metrics import classification_report, nll, predictive_probs, reliability_bins
from psvi.plots import plot_curves, plot_reliability

DOCS = Path(__file__).parent.parent / "docs"
HIDDEN = 100
BATCH = 128
NUM_PARTICLES = 4
LEARNING_RATE = 1e-3
CURVE_POINTS = 8


def run_one(method: str, size: int, steps: int, seed: int, progress: bool) -> dict:
    data = load_mnist(num_train=None if size >= 60000 else size, seed=seed)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), np.asarray(data.y_test)
    model = partial(mlp_classifier, hidden=HIDDEN, subsample_size=min(BATCH, size))
    init = mlp_init_values(x.shape[1], hidden=HIDDEN, seed=seed)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
    engine = make_engine(method, model, guide, LEARNING_RATE, NUM_PARTICLES)

    def predict(params, key, inputs, num_draws):
        full = partial(mlp_classifier, hidden=HIDDEN)
        predictive = Predictive(
            full, guide=guide, params=params, num_samples=num_draws, return_sites=["probs"]
        )
        return predictive(key, inputs)["probs"]

    curve_predict = jax.jit(partial(predict, inputs=x_test[:2000], num_draws=30))
    state = engine.init(jax.random.PRNGKey(seed), x, y)
    update = jax.jit(engine.update)
    every = max(steps // CURVE_POINTS, 1)
    curve, start, fit_seconds = [], time.perf_counter(), 0.0
    for step in tqdm(range(1, steps + 1), disable=not progress, desc=f"{method} n={size}"):
        state, _ = update(state, x, y)
        if step % every == 0 or step == steps:
            fit_seconds += time.perf_counter() - start
            probs = predictive_probs(
                np.asarray(curve_predict(engine.get_params(state), jax.random.PRNGKey(1)))
            )
            curve.append((step * NUM_PARTICLES, nll(probs, y_test[:2000])))
            start = time.perf_counter()
    params = engine.get_params(state)
    sample_probs = np.asarray(
        jax.jit(partial(predict, inputs=x_test, num_draws=100))(params, jax.random.PRNGKey(2))
    )
    report = classification_report(sample_probs, y_test)
    bins = reliability_bins(predictive_probs(sample_probs), y_test)
    return {**report, "score_calls": steps * NUM_PARTICLES, "seconds": fit_seconds, "curve": curve,
            "reliability": {k: np.asarray(v).tolist() for k, v in bins.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k images, 40 steps")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 60000])
    parser.add_argument("--steps", type=int, default=3000)
    options = parser.parse_args()
    sizes, steps = ([1000], 40) if options.quick else (options.sizes, options.steps)
    results = []
    for size in sizes:
        for method in ("psvi", "advi"):
            out = run_one(method, size, steps, seed=0, progress=not options.quick)
            results.append({"method": method, "train_size": size, **out})
            print(f"n={size} {method}: accuracy {out['accuracy']:.4f}, NLL {out['nll']:.4f}, "
                  f"ECE {out['ece']:.4f} ({out['seconds']:.0f} s)", flush=True)  # fmt: skip
    name = "mnist_quick" if options.quick else "mnist"
    path = save(name, {"hidden": HIDDEN, "batch": BATCH, "num_particles": NUM_PARTICLES,
                       "learning_rate": LEARNING_RATE, "steps": steps, "results": results})  # fmt: skip
    print(f"wrote {path}")
    if options.quick:
        return
    label = {"psvi": "ProximalScoreVI", "advi": "ADVI"}
    print("\n| train size | method | accuracy | NLL | ECE | seconds |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['train_size']} | {label[r['method']]} | {r['accuracy']:.4f} | {r['nll']:.4f} | "
              f"{r['ece']:.4f} | {r['seconds']:.0f} |")  # fmt: skip
    for metric in ("nll", "ece"):
        curves = {
            label[m]: (sizes, [r[metric] for r in results if r["method"] == m]) for m in ("psvi", "advi")
        }
        plot_curves(curves, "training images", f"test {metric.upper()}", f"MNIST MLP: test {metric.upper()}",
                    str(DOCS / f"mnist_{metric}_vs_size.png"))  # fmt: skip
    for size in sizes:
        curves = {
            label[r["method"]]: tuple(zip(*r["curve"], strict=True))
            for r in results if r["train_size"] == size
        }  # fmt: skip
        plot_curves(curves, "score calls", "test NLL (2k images)", f"MNIST MLP, {size} training images",
                    str(DOCS / f"mnist_convergence_{size}.png"))  # fmt: skip
    for r in results:
        if r["train_size"] == max(sizes):
            bins = {k: np.asarray(v) for k, v in r["reliability"].items()}
            plot_reliability(bins, f"{label[r['method']]}, {r['train_size']} images",
                             str(DOCS / f"mnist_reliability_{r['method']}.png"))  # fmt: skip


if __name__ == "__main__":
    main()
