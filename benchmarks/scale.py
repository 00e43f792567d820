"""Step cost and peak memory of Bayesian ResNets against the number of weights D.

A ResNet-18-layout network (``resnet_gn``: BasicBlocks (2, 2, 2, 2), GroupNorm, a
3x3 stem for 28x28 inputs) at channel widths 4 .. 64 spans D = 1e4 .. 1e7; on one
mini-batch of 32 MNIST-sized images (random pixels: only the cost is measured) each
method's step is timed (median of ``--repeats`` after two warm-ups; the first step,
with its set-up and compilation, is recorded too) in its own process, and the
process's peak resident memory above its baseline (data and network built, engine not
yet) is read from ``getrusage``:

- ``sgd``: ``S`` plain SGD steps of the deterministic network (the reference);
- ``advi_plain`` / ``psvi_plain``: ``SVI`` + ``Trace_ELBO(S)`` and ``ProximalScoreVI``
  (S particles) on ``bayesian_module(net)``: one sample site per parameter tensor;
- ``advi_flat`` / ``psvi_flat``: the same on ``FlatBayesianModule(net)``: one flat
  site (the fast path);
- NumPyro (``--numpyro``): the same network in Flax (``ResNetGN``), ``numpyro_sgd``
  (``S`` optax SGD steps), ``numpyro_advi`` and ``numpyro_psvi`` on
  ``random_flax_module(net, fan_in_prior())`` (one site per parameter tensor), every
  update ``jax.jit``-compiled; particles in one ``vmap`` pass, or one pass each
  (``_seq``: ``vectorize_particles=False`` for both); ``numpyro_advi_flat`` and
  ``numpyro_psvi_flat`` on ``numpyro_psvi.contrib.models.FlatBayesianModule(net)``
  (one flat site).

All Bayesian variants use AutoNormal, Adam and ``fan_in_prior()``. The ratio reported
is step time over the time of ``S`` SGD steps of the same backend. CPU threads: 1
(``torch.set_num_threads``; XLA's CPU client with ``intra_op_parallelism_threads=1``).

    python -m benchmarks.scale [--widths 4 8 16 32 64] [--particles 4] [--repeats 5] [--numpyro]
        [--numpyro-max-width 16] [--methods M ...] [--tag TAG] [--quick]

writes ``benchmarks/results/scale<tag>.json`` (``scale<tag>_quick.json``) and prints the table
for ``docs/scale.md``.

``--memory-map advi_flat psvi_flat --widths W`` instead maps the live memory of those
steps at width ``W`` (:func:`memory_map`; ``scale_memory_map.json``).

``--mnist`` instead fits the ResNet (``--mnist-width``, default 8) on real MNIST
(``psvi.contrib.datasets.load_mnist``; ``--mnist-train`` images, default 10k) with
ProximalScoreVI and ADVI on ``FlatBayesianModule`` (the same model, guide, S=4,
Adam 1e-3, mini-batches of 64, equal score calls): test cross-entropy against score
calls (the paper's Figure 4; 1k test images, 10 draws) and, at the end, test error,
NLL and ECE on the 10k test images (20 draws), the ELBO of the returned guide (50
seeded mini-batches of the training set, 4 particles each) and the 10/50/90% quantiles
of its sds, and the test error, NLL and ECE of the network at the guide's means
(``mean_network``; with iterate averaging, also the engine's last iterate's metrics,
curve and mean network: ``last_iterate``); ``scale_mnist[<tag>][_quick].json`` and
``docs/scale_mnist[<tag>]_convergence.png`` (``--mnist-tag``).
Methods: ``advi``, ``advi_L<lr>`` (another Adam rate), ``ivon`` (IVON with its ResNet
recipe, the same budget of S = 4 gradients per step), ``psvi`` and its variants
(:func:`mnist_fit`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import RESULTS

METHODS = ("sgd", "advi_plain", "psvi_plain", "advi_flat", "psvi_flat")
NUMPYRO_METHODS = ("numpyro_sgd", "numpyro_advi", "numpyro_psvi", "numpyro_advi_seq", "numpyro_psvi_seq",
                   "numpyro_advi_flat", "numpyro_psvi_flat")  # fmt: skip
BATCH = 32


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock with GroupNorm (4 groups) in place of BatchNorm."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(4, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(4, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(4, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet_gn(width: int, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10) -> nn.Module:
    """A ResNet-18 layout (``width`` = 64 is ResNet-18's channel count, 11.2M weights)
    for one-channel 28x28 images: 3x3 stem, four stages, global average pooling."""
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.GroupNorm(4, width), nn.ReLU()]
    c_in = width
    for stage, count in enumerate(blocks):
        c_out = width * 2**stage
        for i in range(count):
            layers.append(BasicBlock(c_in, c_out, 2 if (i == 0 and stage > 0) else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def flax_resnet_gn(width: int, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10):
    """The Flax twin of :func:`resnet_gn` (NHWC inputs ``(B, 28, 28, 1)``)."""
    import flax.linen as fnn

    class Block(fnn.Module):
        features: int
        stride: int

        @fnn.compact
        def __call__(self, x):
            strides = (self.stride, self.stride)
            out = fnn.Conv(self.features, (3, 3), strides, padding=1, use_bias=False)(x)
            out = fnn.relu(fnn.GroupNorm(num_groups=4)(out))
            out = fnn.GroupNorm(num_groups=4)(fnn.Conv(self.features, (3, 3), padding=1, use_bias=False)(out))
            if self.stride != 1 or x.shape[-1] != self.features:
                x = fnn.Conv(self.features, (1, 1), strides, use_bias=False)(x)
                x = fnn.GroupNorm(num_groups=4)(x)
            return fnn.relu(out + x)

    class ResNetGN(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = fnn.relu(fnn.GroupNorm(num_groups=4)(fnn.Conv(width, (3, 3), padding=1, use_bias=False)(x)))
            for stage, count in enumerate(blocks):
                for i in range(count):
                    x = Block(width * 2**stage, 2 if (i == 0 and stage > 0) else 1)(x)
            return fnn.Dense(num_classes)(x.mean(axis=(1, 2)))

    return ResNetGN()


def numpyro_resnet_model(net, flat: bool = False) -> tuple[Callable, dict | None]:
    """The Bayesian Flax ResNet classifier (``fan_in_prior()``) with a plate subsampling
    mini-batches of ``BATCH``, and the guide's initial values (``None``: the autoguide's
    default): on ``FlatBayesianModule`` (one flat site) or ``random_flax_module`` (one per
    tensor)."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.module import random_flax_module

    from numpyro_psvi.contrib.models import FlatBayesianModule, fan_in_prior, module_classifier

    if flat:
        bayes_net = FlatBayesianModule(net, (1, 28, 28, 1), fan_in_prior())
        init = {"weights": bayes_net.initial_weights}
        return partial(module_classifier, bayes_net, subsample_size=BATCH), init

    def model(x, y=None):
        forward = random_flax_module("net", net, fan_in_prior(), input_shape=(1, 28, 28, 1))
        with numpyro.plate("data", x.shape[0], subsample_size=BATCH) as idx:
            numpyro.sample("y", dist.Categorical(logits=forward(x[idx])), obs=None if y is None else y[idx])

    return model, None


def pyro_resnet_model(
    net: nn.Module, flat: bool = True, batch: int = BATCH
) -> tuple[Callable, dict[str, torch.Tensor]]:
    """The Bayesian classifier of ``net`` (``fan_in_prior()``) with a plate subsampling
    mini-batches of ``batch``, and the guide's initial values (the network's weights):
    on ``FlatBayesianModule`` (one flat site) or ``bayesian_module`` (one per tensor)."""
    from pyro_psvi.contrib.models import FlatBayesianModule, bayesian_module, fan_in_prior, module_classifier

    if flat:
        bayes_net = FlatBayesianModule(net, fan_in_prior())
        init = {"weights": bayes_net.initial_weights}
    else:
        init = {name: p.detach().clone() for name, p in net.named_parameters()}
        bayes_net = bayesian_module(net, fan_in_prior())
    return partial(module_classifier, bayes_net, subsample_size=batch), init


def _make_numpyro_step(method: str, width: int, particles: int):
    """``(step, num_weights, num_tensors)`` for a NumPyro method; ``step()`` blocks."""
    import jax
    import numpyro
    import optax
    from numpyro.infer import SVI, Trace_ELBO, init_to_value
    from numpyro.infer.autoguide import AutoNormal

    from numpyro_psvi import ProximalScoreVI

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (4 * BATCH, 28, 28, 1))
    y = jax.random.randint(key, (4 * BATCH,), 0, 10)
    net = flax_resnet_gn(width)
    params = net.init(key, x[:1])["params"]
    leaves = jax.tree.leaves(params)
    sizes = (sum(leaf.size for leaf in leaves), len(leaves))
    if method == "numpyro_sgd":
        optimizer = optax.sgd(1e-3)

        def loss_fn(p, xb, yb):
            return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": p}, xb), yb).mean()

        @jax.jit
        def sgd_steps(p, state):
            for _ in range(particles):  # S SGD steps
                grads = jax.grad(loss_fn)(p, x[:BATCH], y[:BATCH])
                updates, state = optimizer.update(grads, state, p)
                p = optax.apply_updates(p, updates)
            return p, state

        carry = [params, optimizer.init(params)]

        def step():
            carry[:] = sgd_steps(*carry)
            jax.block_until_ready(carry[0])

        return step, *sizes

    model, init = numpyro_resnet_model(net, flat=method.endswith("_flat"))
    init_loc = {} if init is None else {"init_loc_fn": init_to_value(values=init)}
    guide = AutoNormal(model, init_scale=0.01, **init_loc)
    optim = numpyro.optim.Adam(1e-3)
    vectorize = not method.endswith("_seq")
    if method.startswith("numpyro_psvi"):
        engine = ProximalScoreVI(model, guide, optim, num_particles=particles, vectorize_particles=vectorize)
    else:
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=particles, vectorize_particles=vectorize))
    state = [engine.init(key, x, y)]
    update = jax.jit(engine.update)

    def step():
        state[0] = update(state[0], x, y)[0]
        jax.block_until_ready(state[0])

    return step, *sizes


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _make_step(
    method: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor, particles: int, batch: int = BATCH
):
    """A zero-argument callable doing one step of ``method`` (mini-batches of ``batch``)."""
    if method == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)

        def sgd_steps():
            for _ in range(particles):  # S SGD steps, each on its own mini-batch draw
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x[:batch]), y[:batch]).backward()
                optimizer.step()

        return sgd_steps
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal, init_to_value

    from pyro_psvi import ProximalScoreVI

    pyro.clear_param_store()
    model, init = pyro_resnet_model(net, flat=method.endswith("flat"), batch=batch)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
    optim = pyro.optim.Adam({"lr": 1e-3})
    if method.startswith("psvi"):
        engine = ProximalScoreVI(model, guide, optim, num_particles=particles, vectorize_particles=False)
    else:
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=particles))
    return partial(engine.step, x, y)


def measure_one(method: str, width: int, particles: int, repeats: int) -> dict:
    """Time and peak memory of one method at one width (run in a fresh process)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if method.startswith("numpyro"):
        baseline = _current_rss_mb()
        step, num_weights, num_tensors = _make_numpyro_step(method, width, particles)
    else:
        x, y = torch.randn(4 * BATCH, 1, 28, 28), torch.randint(0, 10, (4 * BATCH,))
        net = resnet_gn(width)
        num_weights, num_tensors = sum(p.numel() for p in net.parameters()), len(list(net.parameters()))
        baseline = _current_rss_mb()
        step = _make_step(method, net, x, y, particles)
    times = []
    for _ in range(repeats + 2):  # two warm-ups (set-up, compilation)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first, timed = times[0], sorted(times[2:])
    return {"method": method, "width": width, "num_weights": num_weights, "num_tensors": num_tensors,
            "seconds": timed[len(timed) // 2], "first_step_seconds": first,
            "peak_extra_mb": peak - baseline}  # fmt: skip


PHASES = ("score_particles", "proximal_problem", "inner_fit", "pull_back", "accept")


def memory_map(method: str, width: int, particles: int, steps: int = 3) -> dict:
    """The live memory of ``method``'s steps (``advi_flat`` or ``psvi_flat``) at ``width``,
    in D-vectors (``4 D`` bytes), above the baseline of the data and network built.

    Run with glibc's mmap threshold at 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so that a
    freed large tensor leaves the resident set at once: the resident set then follows the
    live tensors, as CUDA's allocated bytes do, where ``getrusage``'s peak (the step-cost
    table) also counts what the heap keeps after a free. A thread reads the resident set
    every 0.5 ms: the peak within each phase of ``ProximalScoreVI.update``
    (:data:`PHASES`; ``update`` is the rest of it) and what stays live between steps."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(4 * BATCH, 1, 28, 28), torch.randint(0, 10, (4 * BATCH,))
    net = resnet_gn(width)
    vector = 4 * sum(p.numel() for p in net.parameters())
    phase, peaks, done = ["set-up"], {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[phase[0]] = max(peaks.get(phase[0], 0), resident())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(0.05)
    baseline = resident()
    step = _make_step(method, net, x, y, particles)
    if method.startswith("psvi"):
        from pyro_psvi import ProximalScoreVI

        def labelled(name: str, method_fn: Callable) -> Callable:
            def run(self, *args, **kwargs):
                outer, phase[0] = phase[0], name
                try:
                    return method_fn(self, *args, **kwargs)
                finally:
                    phase[0] = outer

            return run

        for name in PHASES:
            setattr(ProximalScoreVI, name, labelled(name, getattr(ProximalScoreVI, name)))
    between = []
    for _ in range(steps):
        phase[0] = "update"
        step()
        phase[0] = "between steps"
        time.sleep(0.05)
        between.append(resident())
    done.set()
    sampler.join()

    def in_vectors(size: int) -> float:
        return round((size - baseline) / vector, 1)

    return {"method": method, "width": width, "num_weights": vector // 4,
            "live_between_steps": in_vectors(between[-1]),
            "peak": in_vectors(max(value for name, value in peaks.items() if name != "set-up")),
            "phase_peaks": {name: in_vectors(value) for name, value in peaks.items()}}  # fmt: skip


class IVONIntoGuide:
    """An IVON fit (:class:`benchmarks.ivon_baseline.FlatModuleIVON`) stepped like an SVI
    engine, its Gaussian written into the AutoNormal ``guide`` after every step (the
    guide's params are made by one run of it first), so that the evaluation reads it as
    it reads the other methods' guides."""

    def __init__(self, fit, guide, *args) -> None:
        self.fit, self.guide = fit, guide
        guide(*args)

    def step(self, *args) -> None:
        import pyro

        self.fit.step(*args)
        loc, scale = self.fit.posterior()
        with torch.no_grad():  # in place: the guide module reads its params' unconstrained leaves
            pyro.param("AutoNormal.locs.weights").unconstrained().copy_(loc)
            unconstrained_scale = torch.distributions.transform_to(self.guide.scale_constraint).inv(scale)
            pyro.param("AutoNormal.scales.weights").unconstrained().copy_(unconstrained_scale)


def mnist_fit(
    method: str,
    width: int,
    num_train: int,
    steps: int,
    curve_every: int,
    num_test: int,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Fit the ResNet on MNIST with ``method``: ``advi``, ``advi_L<lr>`` (ADVI at Adam's
    rate ``lr``), ``ivon`` (IVON's ResNet recipe, :class:`IVONIntoGuide`), ``psvi``
    (defaults) or ``psvi`` with options after underscores, ``K<n>`` (``inner_steps=n``),
    ``T<c>`` (``trust_region=c``) and ``L<lr>`` (Adam's learning rate, default 1e-3),
    e.g. ``psvi_K1`` or ``psvi_K5_L0.0002``; see the module doc."""
    import numpy as np
    import pyro
    from pyro.infer import SVI, Predictive, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal, init_to_value
    from tqdm import tqdm

    from benchmarks.common import guide_summary
    from benchmarks.ivon_baseline import FlatModuleIVON
    from psvi.contrib.datasets import load_mnist
    from psvi.metrics import classification_report, nll, predictive_probs
    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import FlatBayesianModule, fan_in_prior, module_classifier

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    data = load_mnist(num_train=num_train, seed=seed)
    x = torch.as_tensor(data.x_train, device=device).reshape(-1, 1, 28, 28)
    y = torch.as_tensor(data.y_train, device=device).long()
    x_test = torch.as_tensor(data.x_test[:num_test], device=device).reshape(-1, 1, 28, 28)
    y_test = data.y_test[:num_test]
    net = FlatBayesianModule(resnet_gn(width).to(device), fan_in_prior())
    model = partial(module_classifier, net, subsample_size=64)
    init = init_to_value(values={"weights": net.initial_weights})
    guide = AutoNormal(model, init_loc_fn=init, init_scale=0.01)
    if method.startswith("psvi"):
        keywords = {"K": ("inner_steps", int), "T": ("trust_region", float), "L": ("lr", float)}
        given = method.split("_")[1:]
        unknown = [o for o in given if o[:1] not in keywords]
        if unknown:
            raise ValueError(f"{method}: unknown option(s) {unknown}; use K<n>, T<c> or L<lr>, e.g. psvi_K1")
        options = {keywords[o[0]][0]: keywords[o[0]][1](o[1:]) for o in given}
        optim = pyro.optim.Adam({"lr": options.pop("lr", 1e-3)})
        engine = ProximalScoreVI(model, guide, optim, num_particles=4, vectorize_particles=False, **options)
    elif method == "advi" or method.startswith("advi_L"):
        lr = float(method.removeprefix("advi_L")) if method != "advi" else 1e-3
        engine = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO(num_particles=4))
    elif method == "ivon":
        engine = IVONIntoGuide(FlatModuleIVON(net, len(y), 64, 4, steps, seed=seed), guide, x, y)
    else:
        raise ValueError(f"{method}: use advi, advi_L<lr>, ivon, psvi or psvi_<options>")

    @torch.no_grad()
    def sample_probs(images: torch.Tensor, num_draws: int) -> np.ndarray:
        predictive = Predictive(partial(module_classifier, net), guide=guide, num_samples=1,
                                return_sites=["probs"])  # fmt: skip
        draws = [torch.cat([predictive(chunk)["probs"][0] for chunk in images.split(1000)])
                 for _ in range(num_draws)]  # fmt: skip
        return torch.stack(draws).cpu().numpy()

    @torch.no_grad()
    def mean_network_report(images: torch.Tensor, labels: np.ndarray) -> dict:
        """Test error, NLL and ECE of the network at the guide's means (no weight draws)."""
        predictive = Predictive(partial(module_classifier, net), posterior_samples={
            name: value[None] for name, value in guide.median().items()}, return_sites=["probs"])  # fmt: skip
        probs = torch.cat([predictive(chunk)["probs"][0] for chunk in images.split(1000)])
        report = classification_report(probs[None].cpu().numpy(), labels)
        return {**report, "test_error": 1 - report["accuracy"]}

    @contextmanager
    def last_iterate():
        """The engine's last iterate in the store for a while (with iterate averaging the
        store holds the average; the engine's ``_iterate``, from which the next update
        starts, is read here only: a benchmark's look at the averaging's lag)."""
        iterate = getattr(engine, "_iterate", None)
        saved = {}
        with torch.no_grad():
            for name, value in (iterate or {}).items():
                leaf = pyro.param(name).unconstrained()
                saved[name] = leaf.clone()
                leaf.copy_(value)
        try:
            yield iterate is not None
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    pyro.param(name).unconstrained().copy_(value)

    curve, last_curve, fit_seconds = [], [], 0.0
    for step in tqdm(range(1, steps + 1), desc=f"resnet w={width} {method}", mininterval=10):
        start = time.perf_counter()
        engine.step(x, y)
        fit_seconds += time.perf_counter() - start
        if step % curve_every == 0 or step == steps:
            probs = predictive_probs(sample_probs(x_test[:1000], 10))
            curve.append((step * 4, nll(probs, y_test[:1000])))
            with last_iterate() as averaged:
                if averaged:
                    probs = predictive_probs(sample_probs(x_test[:1000], 10))
                    last_curve.append((step * 4, nll(probs, y_test[:1000])))
    report = classification_report(sample_probs(x_test, 20), y_test)
    mean_network = mean_network_report(x_test, y_test)
    with last_iterate() as averaged:
        last = classification_report(sample_probs(x_test, 20), y_test) if averaged else None
        last_mean_network = mean_network_report(x_test, y_test) if averaged else None
    if last is not None:  # the returned (averaged) guide's metrics above; the last iterate's here
        last = {**last, "test_error": 1 - last["accuracy"], "curve": last_curve,
                "mean_network": last_mean_network}  # fmt: skip
    rejected = getattr(engine, "num_rejected", 0)  # SVI has no rejections
    with torch.no_grad():  # the ELBO of the returned guide: 50 seeded mini-batches, 4 particles each
        losses = []
        for i in range(50):
            pyro.set_rng_seed(1000 + i)
            losses.append(Trace_ELBO(num_particles=4).loss(model, guide, x, y))
    scales = pyro.param("AutoNormal.scales.weights").detach().cpu().numpy()
    return {"method": method, **report, "test_error": 1 - report["accuracy"], "score_calls": steps * 4,
            "seconds": fit_seconds, "curve": curve, "num_rejected": rejected, "mean_network": mean_network,
            **guide_summary(losses, scales), **({"last_iterate": last} if last else {})}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--numpyro", action="store_true", help="also the NumPyro methods")
    parser.add_argument("--numpyro-max-width", type=int, default=16, help="NumPyro methods up to this width")
    parser.add_argument("--quick", action="store_true", help="widths 4 and 8, 2 repeats")
    parser.add_argument("--methods", nargs="+", help="only these methods (each backend's sgd is added)")
    parser.add_argument("--tag", default="", help="suffix of the JSON's name, e.g. _flax_flat")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "WIDTH"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-map", nargs="+", choices=("advi_flat", "psvi_flat"),
        help="the live memory of these methods' steps by phase, at the first of --widths",
    )  # fmt: skip
    parser.add_argument("--mnist", action="store_true", help="the MNIST convergence run instead")
    parser.add_argument("--mnist-width", type=int, default=8)
    parser.add_argument("--mnist-train", type=int, default=10000)
    parser.add_argument("--mnist-steps", type=int, default=600)
    parser.add_argument(
        "--mnist-device", default="cpu", help="e.g. cuda; the JSON is then scale_mnist_<device>"
    )
    parser.add_argument("--mnist-tag", default="", help="suffix of the JSON and plot names, e.g. _long")
    parser.add_argument(
        "--mnist-methods",
        nargs="+",
        default=["psvi", "advi"],
        help="advi, advi_L<lr>, ivon, psvi, psvi_K<n>, psvi_T<c>, psvi_L<lr> (see mnist_fit); "
        "runs merge into the JSON",
    )
    options = parser.parse_args()
    mapping = os.environ.get("MALLOC_MMAP_THRESHOLD_") == "131072"  # set for the child process
    if options.memory_map and mapping and len(options.memory_map) == 1:
        print(json.dumps(memory_map(options.memory_map[0], options.widths[0], options.particles)))
        return
    if options.memory_map:
        from benchmarks.common import machine

        rows = []
        for method in options.memory_map:  # each in its own process: the threshold is read at its start
            command = [sys.executable, "-m", "benchmarks.scale", "--memory-map", method,
                       "--widths", str(options.widths[0]), "--particles", str(options.particles)]  # fmt: skip
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "scale_memory_map.json"
        path.write_text(json.dumps({"machine": machine() + ", 1 torch thread", "batch": BATCH,
                                    "particles": options.particles, "rows": rows}, indent=1))  # fmt: skip
        print(f"wrote {path}")
        return
    if options.mnist:
        mnist_main(options)
        return
    if options.one:
        result = measure_one(options.one[0], int(options.one[1]), options.particles, options.repeats)
        print(json.dumps(result))
        return
    widths, repeats = ([4, 8], 2) if options.quick else (options.widths, options.repeats)
    methods = METHODS + (NUMPYRO_METHODS if options.numpyro else ())
    if options.methods:
        unknown = set(options.methods) - set(METHODS + NUMPYRO_METHODS)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS + NUMPYRO_METHODS}")
        backends = {"numpyro_sgd" if m.startswith("numpyro") else "sgd" for m in options.methods}
        methods = tuple(m for m in METHODS + NUMPYRO_METHODS if m in backends or m in options.methods)
    rows = []
    for width in widths:
        for method in methods:
            if method.startswith("numpyro") and width > options.numpyro_max_width:
                continue
            command = [sys.executable, "-m", "benchmarks.scale", "--one", method, str(width),
                       "--particles", str(options.particles), "--repeats", str(repeats)]  # fmt: skip
            env = {
                **os.environ,
                "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
            }
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"width {width} (D={row['num_weights']}) {method}: {row['seconds']:.3f} s, "
                  f"+{row['peak_extra_mb']:.0f} MB", flush=True)  # fmt: skip
    sgd = {
        (r["method"].startswith("numpyro"), r["width"]): r["seconds"]
        for r in rows
        if r["method"].endswith("sgd")
    }
    for row in rows:
        row["ratio_to_sgd"] = row["seconds"] / sgd[row["method"].startswith("numpyro"), row["width"]]
    from benchmarks.common import machine

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"scale{options.tag}_quick.json" if options.quick else f"scale{options.tag}.json")
    path.write_text(json.dumps({"machine": machine() + ", 1 torch thread", "batch": BATCH,
                                "particles": options.particles, "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {path}\n")
    print("| width | D | tensors | method | s / step | ratio to S SGD steps | first step s | peak extra MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['width']} | {row['num_weights']:.2e} | {row['num_tensors']} | {row['method']} | "
              f"{row['seconds']:.3f} | {row['ratio_to_sgd']:.2f} | {row['first_step_seconds']:.1f} | "
              f"{row['peak_extra_mb']:.0f} |")  # fmt: skip


def mnist_main(options: argparse.Namespace) -> None:
    from benchmarks.common import machine

    width, num_train, steps, every = options.mnist_width, options.mnist_train, options.mnist_steps, 50
    num_test = 10000
    if options.quick:
        width, num_train, steps, every, num_test = 4, 500, 10, 5, 200
    device = options.mnist_device
    runs = [mnist_fit(method, width, num_train, steps, every, num_test, device=device)
            for method in options.mnist_methods]  # fmt: skip

    def metrics(result: dict) -> str:
        return f"test error {result['test_error']:.4f}, NLL {result['nll']:.4f}, ECE {result['ece']:.4f}"

    for run in runs:
        print(f"{run['method']}: {metrics(run)}, ELBO {run['elbo']:.0f}, {run['seconds']:.0f} s, "
              f"{run['num_rejected']} rejected")  # fmt: skip
        print(f"  its mean network: {metrics(run['mean_network'])}")
        if "last_iterate" in run:
            last = run["last_iterate"]
            print(f"  its last iterate: {metrics(last)}")
            print(f"  its last iterate mean network: {metrics(last['mean_network'])}")
    RESULTS.mkdir(exist_ok=True)
    name = ("scale_mnist" if device == "cpu" else f"scale_mnist_{device}") + options.mnist_tag
    path = RESULTS / (f"{name}_quick.json" if options.quick else f"{name}.json")
    settings = {"width": width, "train_images": num_train, "test_images": num_test, "steps": steps}
    if path.exists() and not options.quick:  # keep other methods' runs made with the same settings
        previous = json.loads(path.read_text())
        if all(previous.get(key) == value for key, value in settings.items()):
            names = {run["method"] for run in runs}
            runs = [run for run in previous["runs"] if run["method"] not in names] + runs
    where = machine() + ", 1 torch thread" if device == "cpu" else torch.cuda.get_device_name(device)
    payload = {"machine": where, **settings, "runs": runs}
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    if not options.quick:
        plot_mnist(payload, name)


def plot_mnist(payload: dict, name: str = "scale_mnist") -> None:
    """``docs/<name>_convergence.png`` from a ``<name>.json`` payload."""
    from psvi.contrib.plots import plot_curves

    def label(method: str) -> str:
        if method == "advi":
            return "ADVI"
        if method.startswith("advi_L"):
            return f"ADVI, Adam({method.removeprefix('advi_L')})"
        if method == "ivon":
            return "IVON"
        return "ProximalScoreVI, " + (method.removeprefix("psvi_") if "_" in method else "defaults")

    curves = {label(r["method"]): tuple(zip(*r["curve"], strict=True)) for r in payload["runs"]}
    title = f"Bayesian ResNet (width {payload['width']}) on {payload['train_images']} MNIST images"
    path = Path(__file__).parent.parent / "docs" / f"{name}_convergence.png"
    plot_curves(curves, "score calls", "test cross-entropy (1k images)", title, str(path))


if __name__ == "__main__":
    main()
