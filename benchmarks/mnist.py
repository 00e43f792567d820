"""MNIST BNN (the paper's Figure 3): ProximalScoreVI vs ADVI against training-set size.

A Bayesian MLP (784-100-10, tanh, ``numpyro_psvi.contrib.models.mlp_classifier``; N(0, 1)
priors, or N(0, 1/fan_in) on the weight matrices with ``--prior fan_in``) or a small
CNN (``--model cnn``: two 5x5 convolutions with 8 and 16 ReLU channels, each followed by
2x2 average pooling, then a dense layer to the 10 classes; 5,994 weights; a Flax module
made Bayesian with ``random_flax_module`` and ``numpyro_psvi.contrib.models.fan_in_prior``)
on seeded random subsets of 1k, 5k, 20k and all 60k training images of the real MNIST
(``psvi.contrib.datasets.load_mnist``, local file), evaluated on the full 10k test set. Both
methods fit the same AutoNormal guide (Glorot-uniform means for the MLP, Flax's LeCun
initialisation for the CNN; scale 0.01) with the same particles (S=4), optimizer (Adam
1e-3), mini-batches of 128 through the model's subsampled plate and budget (the same
number of steps, S score calls each); ``psvi`` is ProximalScoreVI with its defaults
(the mini-batch regime's), ``psvi_K<n>`` the same with ``inner_steps=n``, ``advi`` the PPL's SVI with
Trace_ELBO(S), ``advi_psvi`` ADVI for the first half of the steps and ProximalScoreVI from
ADVI's guide for the second half, ``ivon`` IVON (``benchmarks.ivon_baseline``,
torch: the same network, priors, initial means, mini-batches and S gradient samples per
step; IVON's published small-network recipe). Metrics from 100 guide draws: test
accuracy, NLL and ECE (15 bins) of the posterior predictive, reliability bins, and test
NLL against score calls (on 2k test images, 30 draws); the NLL and ECE of each method
after the first minus the first's, with a paired bootstrap standard error over the test
points (``vs_first``); except for IVON, the ELBO of the returned guide (50 seeded
training mini-batches, S particles each) and the 10/50/90% quantiles of its sds. NumPyro
backend (IVON: torch), CPU.

    python -m benchmarks.mnist [--quick] [--model mlp|cnn] [--prior standard|fan_in]
        [--methods psvi advi ...] [--sizes 1000 5000 ...] [--steps N] [--tag _NAME]

writes ``benchmarks/results/mnist.json`` (MLP, N(0, 1) priors), ``mnist_fan_in.json`` or
``mnist_cnn.json`` (with ``--tag`` appended) and, without ``--quick``, the PNGs and the
table printed for ``docs/mnist.md``.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import random_flax_module
from numpyro.infer import Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_value
from tqdm import tqdm

from benchmarks.common import guide_summary, make_engine, method_label, phases, save
from numpyro_psvi.contrib.models import fan_in_prior, mlp_classifier, mlp_init_values
from psvi.contrib.datasets import load_mnist
from psvi.contrib.plots import plot_curves, plot_reliability
from psvi.metrics import classification_report, ece, nll, paired_bootstrap, predictive_probs, reliability_bins

DOCS = Path(__file__).parent.parent / "docs"
HIDDEN = 100
BATCH = 128
NUM_PARTICLES = 4
LEARNING_RATE = 1e-3
CURVE_POINTS = 8


class PatchConv(nn.Module):
    """A VALID, stride-1 convolution written as shifted slices @ kernel: the same function and
    parameters as ``nn.Conv(features, kernel_size, padding="VALID")`` (kernel ``(kh, kw, in,
    out)``, LeCun-normal init, zero bias), but a matmul, which XLA runs several times faster
    on CPU than its convolution when the kernels carry a particle batch (vmap)."""

    features: int
    kernel_size: tuple[int, int]

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        shape = (*self.kernel_size, images.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kh, kw = self.kernel_size
        height, width = images.shape[-3] - kh + 1, images.shape[-2] - kw + 1
        shifted = [images[..., i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)]
        patches = jnp.stack(shifted, axis=-1).reshape(*images.shape[:-3], height, width, -1)  # (in, kh, kw)
        return patches @ kernel.transpose(2, 0, 1, 3).reshape(-1, self.features) + bias


class SmallCNN(nn.Module):
    """Two 5x5 convolutions (8 and 16 ReLU channels) with 2x2 average pooling, then a dense
    layer: 28x28 -> 24x24x8 -> 12x12x8 -> 8x8x16 -> 4x4x16 -> 10 logits."""

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        h = nn.avg_pool(nn.relu(PatchConv(8, (5, 5))(images)), (2, 2), (2, 2))
        h = nn.avg_pool(nn.relu(PatchConv(16, (5, 5))(h)), (2, 2), (2, 2))
        return nn.Dense(10)(h.reshape(h.shape[:-3] + (-1,)))


def cnn_classifier(x: jnp.ndarray, y: jnp.ndarray | None = None, *, subsample_size: int | None = None):
    """:class:`SmallCNN` with ``fan_in_prior()`` weights; ``x`` holds flattened 28x28 images."""
    net = random_flax_module("cnn", SmallCNN(), fan_in_prior(), input_shape=(1, 28, 28, 1))
    with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        logits = net(x[idx].reshape(-1, 28, 28, 1))
        numpyro.deterministic("probs", jax.nn.softmax(logits))
        numpyro.sample("y", dist.Categorical(logits=logits), obs=None if y is None else y[idx])


def cnn_init_values(seed: int) -> dict[str, jnp.ndarray]:
    """Flax's own initialisation of :class:`SmallCNN`, keyed by ``random_flax_module``'s site names."""
    params = SmallCNN().init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)))["params"]
    return {
        f"cnn/{layer}.{name}": value for layer, leaves in params.items() for name, value in leaves.items()
    }


def make_model(model_name: str, prior: str, num_inputs: int, seed: int):
    """The model (a function of ``x, y, subsample_size``) and its initial values."""
    if model_name == "cnn":
        return cnn_classifier, cnn_init_values(seed)
    model = partial(mlp_classifier, hidden=HIDDEN, scale_by_fan_in=prior == "fan_in")
    return model, mlp_init_values(num_inputs, hidden=HIDDEN, seed=seed)


def run_ivon(data, model_name: str, prior: str, steps: int, seed: int) -> tuple[np.ndarray, list]:
    """IVON's test probabilities (100 draws) and its curve (test NLL on 2k images, 30 draws)."""
    from benchmarks.ivon_baseline import IVONSettings, cnn_classifier, fit_classifier, mlp_classifier

    _, init = make_model(model_name, prior, data.x_train.shape[1], seed)
    if model_name == "cnn":
        net = cnn_classifier(init)
    else:
        net = mlp_classifier(init, prior_scale=1.0, scale_by_fan_in=prior == "fan_in")
    every = max(steps // CURVE_POINTS, 1)
    probs, points = fit_classifier(
        net, data.x_train, data.y_train, data.x_test, steps=steps, seed=seed, batch=BATCH,
        num_particles=NUM_PARTICLES, num_draws=100, settings=IVONSettings(),
        curve=(data.x_test[:2000], every, 30),
    )  # fmt: skip
    y_curve = np.asarray(data.y_test[:2000])
    return probs, [(step * NUM_PARTICLES, nll(predictive_probs(p), y_curve)) for step, p in points]


def run_one(
    method: str, model_name: str, prior: str, size: int, steps: int, seed: int, progress: bool
) -> dict:
    data = load_mnist(num_train=None if size >= 60000 else size, seed=seed)
    if method == "ivon":
        start = time.perf_counter()
        sample_probs, curve = run_ivon(data, model_name, prior, steps, seed)
        return _report(sample_probs, np.asarray(data.y_test), steps, time.perf_counter() - start, curve)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), np.asarray(data.y_test)
    full, init = make_model(model_name, prior, x.shape[1], seed)
    model = partial(full, subsample_size=min(BATCH, size))
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)

    def predict(params, key, inputs, num_draws):
        predictive = Predictive(
            full, guide=guide, params=params, num_samples=num_draws, return_sites=["probs"]
        )
        return predictive(key, inputs)["probs"]

    curve_predict = jax.jit(partial(predict, inputs=x_test[:2000], num_draws=30))
    every = max(steps // CURVE_POINTS, 1)
    curve, start, fit_seconds, step, params = [], time.perf_counter(), 0.0, 0, None
    for kind, phase_steps in phases(method, steps):
        base, _, inner = kind.partition("_K")
        options = {"inner_steps": int(inner)} if inner else {}
        engine = make_engine(base, model, guide, LEARNING_RATE, NUM_PARTICLES, **options)
        state = engine.init(jax.random.PRNGKey(seed), x, y, init_params=params)
        update = jax.jit(engine.update)
        for _ in tqdm(range(phase_steps), disable=not progress, desc=f"{model_name} {kind} n={size}"):
            state, _ = update(state, x, y)
            step += 1
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
    elbo = jax.jit(lambda key: Trace_ELBO(num_particles=NUM_PARTICLES).loss(key, params, model, guide, x, y))
    losses = [float(elbo(jax.random.PRNGKey(1000 + i))) for i in range(50)]
    scales = np.concatenate([np.ravel(v) for k, v in params.items() if k.endswith("_auto_scale")])
    return {**_report(sample_probs, y_test, steps, fit_seconds, curve), **guide_summary(losses, scales)}


def _report(
    sample_probs: np.ndarray, y_test: np.ndarray, steps: int, fit_seconds: float, curve: list
) -> dict:
    report = classification_report(sample_probs, y_test)
    bins = reliability_bins(predictive_probs(sample_probs), y_test)
    return {**report, "score_calls": steps * NUM_PARTICLES, "seconds": fit_seconds, "curve": curve,
            "reliability": {k: np.asarray(v).tolist() for k, v in bins.items()},
            "probs": predictive_probs(sample_probs)}  # fmt: skip


def against_first(results: list[dict], y_test: np.ndarray) -> None:
    """Add to each result after the first its NLL and ECE minus the first's, with the
    paired bootstrap standard error over the test points (``vs_first``), and drop the
    test probabilities the comparison used."""
    first = results[0]["probs"]
    for result in results[1:]:
        result["vs_first"] = {
            name: paired_bootstrap(metric, result["probs"], first, y_test)
            for name, metric in (("nll", nll), ("ece", ece))
        }
    for result in results:
        del result["probs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k images, 40 steps")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument(
        "--prior",
        choices=("standard", "fan_in"),
        default="standard",
        help="MLP priors: N(0, 1), or N(0, 1/fan_in) on weight matrices (CNN: fan_in)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["psvi", "advi"], help="psvi, psvi_K<n>, advi, advi_psvi, ivon"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 60000])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--tag", default="", help="appended to the JSON and PNG names (keeps earlier runs)")
    options = parser.parse_args()
    sizes, steps = ([1000], 40) if options.quick else (options.sizes, options.steps)
    prior = "fan_in" if options.model == "cnn" else options.prior
    tag = ("_cnn" if options.model == "cnn" else "_fan_in" if prior == "fan_in" else "") + options.tag
    results = []
    y_test = np.asarray(load_mnist(num_train=1000, seed=0).y_test)
    for size in sizes:
        at_size = []
        for method in options.methods:
            out = run_one(method, options.model, prior, size, steps, seed=0, progress=not options.quick)
            at_size.append({"method": method, "train_size": size, **out})
            print(f"{options.model} n={size} {method}: accuracy {out['accuracy']:.4f}, NLL {out['nll']:.4f}, "
                  f"ECE {out['ece']:.4f} ({out['seconds']:.0f} s)", flush=True)  # fmt: skip
        against_first(at_size, y_test)
        for result in at_size[1:]:
            print(
                f"  {result['method']} - {at_size[0]['method']}: "
                + ", ".join(
                    f"{name} {diff:+.4f} +- {se:.4f}" for name, (diff, se) in result["vs_first"].items()
                )
            )
        results.extend(at_size)
    name = f"mnist{tag}_quick" if options.quick else f"mnist{tag}"
    path = save(name, {"model": options.model, "prior": prior, "hidden": HIDDEN, "batch": BATCH,
                       "num_particles": NUM_PARTICLES, "learning_rate": LEARNING_RATE, "steps": steps,
                       "results": results})  # fmt: skip
    print(f"wrote {path}")
    if options.quick:
        return
    title = f"MNIST {options.model.upper()}" + (", fan-in prior" if prior == "fan_in" else "")
    print("\n| train size | method | accuracy | NLL | ECE | seconds |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['train_size']} | {method_label(r['method'])} | {r['accuracy']:.4f} | {r['nll']:.4f} | "
              f"{r['ece']:.4f} | {r['seconds']:.0f} |")  # fmt: skip
    for metric in ("nll", "ece"):
        curves = {
            method_label(m): (sizes, [r[metric] for r in results if r["method"] == m])
            for m in options.methods
        }
        plot_curves(curves, "training images", f"test {metric.upper()}", f"{title}: test {metric.upper()}",
                    str(DOCS / f"mnist{tag}_{metric}_vs_size.png"))  # fmt: skip
    for size in sizes:
        curves = {
            method_label(r["method"]): tuple(zip(*r["curve"], strict=True))
            for r in results if r["train_size"] == size
        }  # fmt: skip
        plot_curves(curves, "score calls", "test NLL (2k images)", f"{title}, {size} training images",
                    str(DOCS / f"mnist{tag}_convergence_{size}.png"))  # fmt: skip
    for r in results:
        if r["train_size"] == max(sizes):
            bins = {k: np.asarray(v) for k, v in r["reliability"].items()}
            plot_reliability(bins, f"{method_label(r['method'])}, {r['train_size']} images",
                             str(DOCS / f"mnist{tag}_reliability_{r['method']}.png"))  # fmt: skip


if __name__ == "__main__":
    main()
