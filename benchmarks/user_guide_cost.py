"""Time per step of ProximalScoreVI vs SVI(Trace_ELBO) with hand-written guides (issue 24).

Four examples of the PPLs' tutorials, each with its hand-written guide, and a plate of
Gamma latents, in both backends: the coin (Beta-Bernoulli, a Beta guide), Poisson rates
(100 counts, ``rate_i ~ Gamma(2, 1)``, a ``Gamma(a, b)`` guide with vector params under the
plate), eight schools (centered; Normal,
LogNormal and a plate of Normals), Bayesian regression II (the rugged-terrain regression
on synthetic data of the same size, N = 170; Normal weights, a scaled logit-Normal
noise on ``Uniform(0, 10)``) and a VAE on the 8x8 digits (an amortized encoder guide,
a decoder in the model, mini-batches of 64 as the model's arguments). Equal particles
(4); SVI vectorized. Timed in interleaved blocks in one process; medians, and the ratio
to SVI's. NumPyro steps are jitted; torch runs on one thread.

    python -m benchmarks.user_guide_cost [--blocks 5] [--steps 20] [--inner-steps 5 1] [--quick]
    python -m benchmarks.user_guide_cost --equal-time 20   # the VAE's -ELBO at equal wall time
    python -m benchmarks.user_guide_cost --equal-steps --inner-steps 20 5 3   # ... at equal updates
    python -m benchmarks.user_guide_cost --equal-steps epochs --inner-steps 20 --decoder-lr-scale 1 20
    python -m benchmarks.user_guide_cost --guide-runs      # Pyro's floor: plain guide runs vs SVI
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import sklearn.datasets

from benchmarks.common import adam_with_decoder_scaled, save
from benchmarks.step_cost import _median_block_times

PARTICLES = 4
LATENT, HIDDEN = 4, 64


def _digits_batch() -> np.ndarray:
    images = sklearn.datasets.load_digits().data / 16.0 > 0.5
    return images[:64].astype(np.float32)


def _regression_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    africa = (rng.random(170) < 0.3).astype(np.float32)
    rugged = rng.gamma(1.5, 1.0, 170).astype(np.float32)
    y = 9.2 - 1.9 * africa - 0.2 * rugged + 0.4 * africa * rugged + rng.normal(0, 0.9, 170)
    return africa, rugged, y.astype(np.float32)


def _counts() -> np.ndarray:
    """100 Poisson counts of rate 3 (the rates example)."""
    return np.random.default_rng(0).poisson(3.0, 100).astype(np.float32)


EIGHT_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
EIGHT_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def pyro_examples() -> dict[str, tuple[Callable, Callable, tuple]]:
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints
    from torch.distributions.transforms import AffineTransform, SigmoidTransform

    def coin_model(data):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Bernoulli(f), obs=data)

    def coin_guide(data):
        alpha = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
        beta = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
        pyro.sample("f", dist.Beta(alpha, beta))

    def eight_model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    def eight_guide(y, sigma):
        positive = constraints.positive
        mu_loc, mu_scale = (
            pyro.param("mu_loc", torch.tensor(0.0)),
            pyro.param("mu_scale", torch.tensor(1.0), constraint=positive),
        )
        tau_loc, tau_scale = (
            pyro.param("tau_loc", torch.tensor(0.0)),
            pyro.param("tau_scale", torch.tensor(1.0), constraint=positive),
        )
        theta_loc = pyro.param("theta_loc", torch.zeros(len(y)))
        theta_scale = pyro.param("theta_scale", torch.ones(len(y)), constraint=positive)
        pyro.sample("mu", dist.Normal(mu_loc, mu_scale))
        pyro.sample("tau", dist.LogNormal(tau_loc, tau_scale))
        with pyro.plate("schools", len(y)):
            pyro.sample("theta", dist.Normal(theta_loc, theta_scale))

    def regression_model(africa, rugged, y):
        a = pyro.sample("a", dist.Normal(0.0, 10.0))
        b_a = pyro.sample("bA", dist.Normal(0.0, 1.0))
        b_r = pyro.sample("bR", dist.Normal(0.0, 1.0))
        b_ar = pyro.sample("bAR", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = a + b_a * africa + b_r * rugged + b_ar * africa * rugged
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)

    def regression_guide(africa, rugged, y):
        a_loc = pyro.param("a_loc", torch.tensor(0.0))
        a_scale = pyro.param("a_scale", torch.tensor(1.0), constraint=constraints.positive)
        sigma_loc = pyro.param("sigma_loc", torch.tensor(0.0))
        weights_loc = pyro.param("weights_loc", torch.randn(3))
        weights_scale = pyro.param("weights_scale", torch.ones(3), constraint=constraints.positive)
        pyro.sample("a", dist.Normal(a_loc, a_scale))
        pyro.sample("bA", dist.Normal(weights_loc[0], weights_scale[0]))
        pyro.sample("bR", dist.Normal(weights_loc[1], weights_scale[1]))
        pyro.sample("bAR", dist.Normal(weights_loc[2], weights_scale[2]))
        on_support = [SigmoidTransform(), AffineTransform(0.0, 10.0)]
        pyro.sample("sigma", dist.TransformedDistribution(dist.Normal(sigma_loc, 0.05), on_support))

    class Encoder(torch.nn.Module):
        def __init__(self, pixels: int) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(pixels, HIDDEN)
            self.loc, self.log_scale = torch.nn.Linear(HIDDEN, LATENT), torch.nn.Linear(HIDDEN, LATENT)

        def forward(self, x):
            h = torch.nn.functional.softplus(self.hidden(x))
            return self.loc(h), self.log_scale(h).exp()

    pixels = 64
    encoder = Encoder(pixels)
    decoder = torch.nn.Sequential(
        torch.nn.Linear(LATENT, HIDDEN),
        torch.nn.Softplus(),
        torch.nn.Linear(HIDDEN, pixels),
        torch.nn.Sigmoid(),
    )

    def vae_model(batch):
        pyro.module("decoder", decoder)
        with pyro.plate("batch", batch.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
            pyro.sample("obs", dist.Bernoulli(decoder(z)).to_event(1), obs=batch)

    def vae_guide(batch):
        pyro.module("encoder", encoder)
        loc, scale = encoder(batch)
        with pyro.plate("batch", batch.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def rates_model(y):
        with pyro.plate("units", len(y)):
            rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
            pyro.sample("y", dist.Poisson(rate), obs=y)

    def rates_guide(y):
        a = pyro.param("rate_a", torch.full((len(y),), 2.0), constraint=constraints.positive)
        b = pyro.param("rate_b", torch.ones(len(y)), constraint=constraints.positive)
        with pyro.plate("units", len(y)):
            pyro.sample("rate", dist.Gamma(a, b))

    eight = (torch.tensor(EIGHT_Y), torch.tensor(EIGHT_SIGMA))
    return {
        "coin": (coin_model, coin_guide, (torch.tensor([1.0] * 6 + [0.0] * 4),)),
        "Poisson rates": (rates_model, rates_guide, (torch.tensor(_counts()),)),
        "eight schools": (eight_model, eight_guide, eight),
        "regression II": (regression_model, regression_guide, tuple(map(torch.tensor, _regression_data()))),
        "VAE": (vae_model, vae_guide, (torch.tensor(_digits_batch()),)),
    }


def numpyro_examples() -> dict[str, tuple[Callable, Callable, tuple]]:
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from jax.example_libraries import stax
    from numpyro.distributions import constraints
    from numpyro.distributions.transforms import AffineTransform, SigmoidTransform

    def coin_model(data):
        f = numpyro.sample("f", dist.Beta(10.0, 10.0))
        with numpyro.plate("data", len(data)):
            numpyro.sample("obs", dist.Bernoulli(f), obs=data)

    def coin_guide(data):
        alpha = numpyro.param("alpha_q", 15.0, constraint=constraints.positive)
        beta = numpyro.param("beta_q", 15.0, constraint=constraints.positive)
        numpyro.sample("f", dist.Beta(alpha, beta))

    def eight_model(y, sigma):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        with numpyro.plate("schools", len(y)):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
            numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    def eight_guide(y, sigma):
        positive = constraints.positive
        mu_loc, mu_scale = numpyro.param("mu_loc", 0.0), numpyro.param("mu_scale", 1.0, constraint=positive)
        tau_loc, tau_scale = (
            numpyro.param("tau_loc", 0.0),
            numpyro.param("tau_scale", 1.0, constraint=positive),
        )
        theta_loc = numpyro.param("theta_loc", jnp.zeros(len(y)))
        theta_scale = numpyro.param("theta_scale", jnp.ones(len(y)), constraint=positive)
        numpyro.sample("mu", dist.Normal(mu_loc, mu_scale))
        numpyro.sample("tau", dist.LogNormal(tau_loc, tau_scale))
        with numpyro.plate("schools", len(y)):
            numpyro.sample("theta", dist.Normal(theta_loc, theta_scale))

    def regression_model(africa, rugged, y):
        a = numpyro.sample("a", dist.Normal(0.0, 10.0))
        b_a = numpyro.sample("bA", dist.Normal(0.0, 1.0))
        b_r = numpyro.sample("bR", dist.Normal(0.0, 1.0))
        b_ar = numpyro.sample("bAR", dist.Normal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = a + b_a * africa + b_r * rugged + b_ar * africa * rugged
        with numpyro.plate("data", len(y)):
            numpyro.sample("obs", dist.Normal(mean, sigma), obs=y)

    def regression_guide(africa, rugged, y):
        a_loc = numpyro.param("a_loc", 0.0)
        a_scale = numpyro.param("a_scale", 1.0, constraint=constraints.positive)
        sigma_loc = numpyro.param("sigma_loc", 0.0)
        weights_loc = numpyro.param("weights_loc", jnp.array([0.5, -0.5, 0.2]))
        weights_scale = numpyro.param("weights_scale", jnp.ones(3), constraint=constraints.positive)
        numpyro.sample("a", dist.Normal(a_loc, a_scale))
        numpyro.sample("bA", dist.Normal(weights_loc[0], weights_scale[0]))
        numpyro.sample("bR", dist.Normal(weights_loc[1], weights_scale[1]))
        numpyro.sample("bAR", dist.Normal(weights_loc[2], weights_scale[2]))
        on_support = [SigmoidTransform(), AffineTransform(0.0, 10.0)]
        numpyro.sample("sigma", dist.TransformedDistribution(dist.Normal(sigma_loc, 0.05), on_support))

    encoder = stax.serial(
        stax.Dense(HIDDEN), stax.Softplus, stax.FanOut(2),
        stax.parallel(stax.Dense(LATENT), stax.serial(stax.Dense(LATENT), stax.Exp)),
    )  # fmt: skip
    decoder = stax.serial(stax.Dense(HIDDEN), stax.Softplus, stax.Dense(64), stax.Sigmoid)

    def vae_model(batch):
        num, pixels = batch.shape
        decode = numpyro.module("decoder", decoder, (num, LATENT))
        with numpyro.plate("batch", num):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([LATENT]).to_event(1))
            numpyro.sample("obs", dist.Bernoulli(decode(z)).to_event(1), obs=batch)

    def vae_guide(batch):
        num, pixels = batch.shape
        loc, scale = numpyro.module("encoder", encoder, (num, pixels))(batch)
        with numpyro.plate("batch", num):
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def rates_model(y):
        with numpyro.plate("units", len(y)):
            rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
            numpyro.sample("y", dist.Poisson(rate), obs=y)

    def rates_guide(y):
        a = numpyro.param("rate_a", jnp.full((len(y),), 2.0), constraint=constraints.positive)
        b = numpyro.param("rate_b", jnp.ones(len(y)), constraint=constraints.positive)
        with numpyro.plate("units", len(y)):
            numpyro.sample("rate", dist.Gamma(a, b))

    eight = (jnp.asarray(EIGHT_Y), jnp.asarray(EIGHT_SIGMA))
    return {
        "coin": (coin_model, coin_guide, (jnp.asarray([1.0] * 6 + [0.0] * 4),)),
        "Poisson rates": (rates_model, rates_guide, (jnp.asarray(_counts()),)),
        "eight schools": (eight_model, eight_guide, eight),
        "regression II": (regression_model, regression_guide, tuple(map(jnp.asarray, _regression_data()))),
        "VAE": (vae_model, vae_guide, (jnp.asarray(_digits_batch()),)),
    }


def _engines(inner_steps: tuple[int, ...]) -> dict[str, int | None]:
    """Labels and inner steps: SVI (``-1``), the engine's default ``K`` (``None``), ``K``s."""
    return {
        "SVI": -1,
        "ProximalScoreVI (default K)": None,
        **{f"ProximalScoreVI, K = {k}": k for k in inner_steps},
    }


def pyro_steppers(example: tuple, inner_steps: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from pyro_psvi import ProximalScoreVI

    model, guide, args = example
    steppers = {}
    for label, inner in _engines(inner_steps).items():
        torch.manual_seed(0)
        with pyro.get_param_store().scope() as scope:  # each engine its own params
            optim = pyro.optim.Adam({"lr": 1e-2})
            if inner == -1:
                engine = SVI(
                    model, guide, optim, Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True)
                )
            else:
                engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=inner)
            engine.step(*args)

        def step(engine=engine, scope=scope):
            with pyro.get_param_store().scope(scope):
                engine.step(*args)

        steppers[label] = step
    return steppers


def numpyro_steppers(example: tuple, inner_steps: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    import jax
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_psvi import ProximalScoreVI

    model, guide, args = example
    steppers = {}
    for label, inner in _engines(inner_steps).items():
        optim = numpyro.optim.Adam(1e-2)
        if inner == -1:
            engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES))
        else:
            engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=inner)
        state = [engine.init(jax.random.PRNGKey(0), *args)]
        update = jax.jit(engine.update)

        def step(update=update, state=state):
            state[0] = update(state[0], *args)[0]
            jax.block_until_ready(state[0])

        steppers[label] = step
    return steppers


def pyro_equal_time(seconds: float, inner_steps: tuple[int, ...]) -> list[dict]:
    """The VAE's ``-ELBO`` (256 particles) on its batch after ``seconds`` of steps."""
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from pyro_psvi import ProximalScoreVI

    rows = []
    for label, inner in _engines(inner_steps).items():
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide, args = pyro_examples()["VAE"]  # fresh networks
        optim = pyro.optim.Adam({"lr": 1e-2})
        if inner == -1:
            engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True))
        else:
            engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=inner)
        steps = _steps_for(seconds, lambda engine=engine, args=args: engine.step(*args))
        torch.manual_seed(1)
        loss = Trace_ELBO(num_particles=256, vectorize_particles=True).loss(model, guide, *args)
        rows.append({"backend": "pyro", "engine": label, "steps": steps, "neg_elbo": loss})
    return rows


def numpyro_equal_time(seconds: float, inner_steps: tuple[int, ...]) -> list[dict]:
    """As :func:`pyro_equal_time`, jitted steps (the first, compiling, not counted)."""
    import jax
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_psvi import ProximalScoreVI

    model, guide, args = numpyro_examples()["VAE"]
    rows = []
    for label, inner in _engines(inner_steps).items():
        optim = numpyro.optim.Adam(1e-2)
        if inner == -1:
            engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES))
        else:
            engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=inner)
        state = [engine.init(jax.random.PRNGKey(0), *args)]
        update = jax.jit(engine.update)

        def step(update=update, state=state):
            state[0] = update(state[0], *args)[0]
            jax.block_until_ready(state[0])

        step()
        steps = _steps_for(seconds, step)
        params = engine.get_params(state[0])
        loss = Trace_ELBO(num_particles=256).loss(jax.random.PRNGKey(1), params, model, guide, *args)
        rows.append({"backend": "numpyro", "engine": label, "steps": steps, "neg_elbo": float(loss)})
    return rows


def pyro_guide_run_floor(blocks: int, steps: int) -> list[dict]:
    """Per Pyro example: SVI's step, one plain run of its hand-written guide (the least an
    inner step can cost: no trace, no gradient), and twenty runs against SVI's step (the
    floor of the default K's inner steps)."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    rows = []
    for name, (model, guide, args) in pyro_examples().items():
        pyro.clear_param_store()
        elbo = Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        steppers = {
            "SVI": lambda svi=svi, args=args: svi.step(*args),
            "guide run": lambda guide=guide, args=args: guide(*args),
        }
        times = _median_block_times(steppers, blocks, steps)
        svi_ms, run_ms = 1e3 * times["SVI"], 1e3 * times["guide run"]
        ratio = 20 * run_ms / svi_ms
        rows.append({"example": name, "svi_ms": svi_ms, "guide_run_ms": run_ms, "twenty_runs_to_svi": ratio})
        print(f"pyro {name:14s} SVI {svi_ms:.2f} ms, guide run {run_ms:.3f} ms, 20 runs / SVI {ratio:.2f}x")
    return rows


def _digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The binarized digits in examples/numpyro_vae.py's split: 1,500 to train, the rest held out."""
    images = (sklearn.datasets.load_digits().data / 16.0 > 0.5).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(images))
    return images[order[:1500]], images[order[1500:]]


# The VAE at equal steps: (Adam's step size, checkpoints in updates) of each protocol.
EQUAL_STEPS = {"batch": (1e-2, (250, 1000, 2000)), "epochs": (1e-3, (23, 115, 460, 1380))}


def vae_equal_steps(
    backend: str, protocol: str, inner_steps: tuple[int, ...], seed: int, decoder_lr_scale: float = 1.0
) -> list[dict]:
    """The VAE's ``-ELBO`` after each checkpoint's number of updates of SVI and of each
    ``K`` (the same score calls). ``"batch"``: on its one batch of 64 (256 particles),
    Adam(1e-2); ``"epochs"``: trained on 1,500 digits in batches of 64 passed as the
    model's arguments (examples/numpyro_vae.py), Adam(1e-3), and the held-out ``-ELBO`` per
    image (64 particles) after 1, 5, 20 and 60 epochs. ``seconds``: the updates' time to
    each checkpoint (the first update, which compiles or sets up, included; the losses not).
    ``decoder_lr_scale``: the decoder's (the model's params') step size over the
    encoder's, for every engine (docs/guides.md, "Model params: one optimizer step
    per update")."""
    lr, checkpoints = EQUAL_STEPS[protocol]
    train, test = _digits_split()
    batches = [train[i : i + 64] for i in range(0, len(train) - 63, 64)] if protocol == "epochs" else None
    rows = []
    for inner in [-1, *inner_steps]:
        fit = _pyro_vae_fit if backend == "pyro" else _numpyro_vae_fit
        step, loss = fit(inner, lr, seed, decoder_lr_scale)
        done, losses, seconds, elapsed = 0, [], [], 0.0
        for checkpoint in checkpoints:
            start = time.perf_counter()
            for i in range(done, checkpoint):
                step(None if batches is None else batches[i % len(batches)])
            elapsed += time.perf_counter() - start
            done = checkpoint
            seconds.append(elapsed)
            losses.append(loss(None) if batches is None else loss(test) / len(test))
        engine = "SVI" if inner == -1 else f"ProximalScoreVI, K = {inner}"
        rows.append({"backend": backend, "protocol": protocol, "engine": engine, "seed": seed,
                     "decoder_lr_scale": decoder_lr_scale, "updates": list(checkpoints),
                     "neg_elbo": losses, "seconds": seconds})  # fmt: skip
        print(
            f"{backend:8s} {protocol:7s} seed {seed} decoder lr x{decoder_lr_scale:g} {engine:26s}",
            " ".join(f"{x:8.2f} ({t:.1f} s)" for x, t in zip(losses, seconds, strict=True)),
        )
    return rows


def _pyro_vae_fit(
    inner: int, lr: float, seed: int, decoder_lr_scale: float = 1.0
) -> tuple[Callable, Callable]:
    """``step(batch)`` and ``loss(batch)`` of a fresh VAE (``None``: its own batch)."""
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from pyro_psvi import ProximalScoreVI

    pyro.clear_param_store()
    torch.manual_seed(seed)
    model, guide, (own,) = pyro_examples()["VAE"]  # fresh networks
    optim = pyro.optim.Adam(
        {"lr": lr}
        if decoder_lr_scale == 1.0
        else lambda name: {"lr": lr * decoder_lr_scale if name.startswith("decoder") else lr}
    )
    if inner == -1:
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=inner)

    def loss(batch):
        torch.manual_seed(1)
        particles = 256 if batch is None else 64
        batch = own if batch is None else torch.as_tensor(batch)
        return Trace_ELBO(num_particles=particles, vectorize_particles=True).loss(model, guide, batch)

    return lambda batch: engine.step(own if batch is None else torch.as_tensor(batch)), loss


def _numpyro_vae_fit(
    inner: int, lr: float, seed: int, decoder_lr_scale: float = 1.0
) -> tuple[Callable, Callable]:
    """As :func:`_pyro_vae_fit`, jitted updates (another decoder step size:
    :func:`~benchmarks.common.adam_with_decoder_scaled`)."""
    import jax
    import jax.numpy as jnp
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_psvi import ProximalScoreVI

    model, guide, (own,) = numpyro_examples()["VAE"]
    optim = adam_with_decoder_scaled(lr, decoder_lr_scale)
    if inner == -1:
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=inner)
    state = [engine.init(jax.random.PRNGKey(seed), own)]
    update = jax.jit(engine.update)

    def step(batch):  # synced: the checkpoints' seconds are the updates' own
        state[0] = jax.block_until_ready(update(state[0], own if batch is None else jnp.asarray(batch))[0])

    def loss(batch):
        particles = 256 if batch is None else 64
        batch = own if batch is None else jnp.asarray(batch)
        params = engine.get_params(state[0])
        estimate = Trace_ELBO(num_particles=particles)
        return float(estimate.loss(jax.random.PRNGKey(1), params, model, guide, batch))

    return step, loss


def _steps_for(seconds: float, step: Callable[[], None]) -> int:
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--warm-up", type=int, default=3,
        help="untimed steps of each engine first (e.g. 600: the fits' steady state, not their start)",
    )  # fmt: skip
    parser.add_argument("--inner-steps", type=int, nargs="*", default=[5, 1])
    parser.add_argument("--backends", nargs="*", default=["pyro", "numpyro"])
    parser.add_argument("--quick", action="store_true", help="one block of 2 steps (a smoke run)")
    parser.add_argument(
        "--equal-time", type=float, default=None, metavar="SECONDS",
        help="instead: the VAE's -ELBO after SECONDS of steps of each engine (NumPyro: a quarter)",
    )  # fmt: skip
    parser.add_argument(
        "--guide-runs", action="store_true",
        help="instead: Pyro's floor, one plain run of each guide against SVI's step",
    )  # fmt: skip
    parser.add_argument(
        "--equal-steps", nargs="*", choices=sorted(EQUAL_STEPS), default=None, metavar="PROTOCOL",
        help="instead: the VAE's -ELBO at equal updates of SVI and each --inner-steps (batch, epochs)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=2, help="--equal-steps only")
    parser.add_argument(
        "--decoder-lr-scale", type=float, nargs="+", default=[1.0],
        help="--equal-steps only: the decoder's step size over the encoder's, each a run of every engine",
    )  # fmt: skip
    parser.add_argument("--tag", default="", help="a suffix to the JSON's name in benchmarks/results")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.quick:
        args.blocks, args.steps = 1, 2
    if args.guide_runs:
        rows = pyro_guide_run_floor(args.blocks, 2 * args.steps)
        save("user_guide_floor" + args.tag, {"particles": PARTICLES, "blocks": args.blocks, "rows": rows})
        return
    if args.equal_steps is not None:
        rows = [
            row
            for backend in args.backends
            for protocol in args.equal_steps or sorted(EQUAL_STEPS)
            for scale in args.decoder_lr_scale
            for seed in range(args.seeds)
            for row in vae_equal_steps(backend, protocol, tuple(args.inner_steps), seed, scale)
        ]
        save(
            "user_guide_equal_steps" + args.tag,
            {"particles": PARTICLES, "protocols": EQUAL_STEPS, "rows": rows},
        )
        return
    if args.equal_time is not None:
        inner = tuple(args.inner_steps)
        rows = pyro_equal_time(args.equal_time, inner) + numpyro_equal_time(args.equal_time / 4, inner)
        for row in rows:
            print(
                f"{row['backend']:8s} {row['engine']:30s} {row['steps']:6d} steps -ELBO {row['neg_elbo']:.1f}"
            )
        save(
            "user_guide_equal_time" + args.tag,
            {"seconds": args.equal_time, "particles": PARTICLES, "rows": rows},
        )
        return
    rows = []
    for backend in args.backends:
        examples = pyro_examples() if backend == "pyro" else numpyro_examples()
        build = pyro_steppers if backend == "pyro" else numpyro_steppers
        for name, example in examples.items():
            steps = args.steps * (10 if backend == "numpyro" else 1)  # sub-millisecond steps
            steppers = build(example, tuple(args.inner_steps))
            times = _median_block_times(steppers, args.blocks, steps, args.warm_up)
            for label, seconds in times.items():
                ratio = seconds / times["SVI"]
                row = {"backend": backend, "example": name, "engine": label}
                rows.append({**row, "ms_per_step": 1e3 * seconds, "ratio_to_svi": ratio})
                print(
                    f"{backend:8s} {name:14s} {label:30s} {1e3 * seconds:8.3f} ms  {ratio:5.2f}x", flush=True
                )
    name = "user_guide_cost_quick" if args.quick else "user_guide_cost"
    save(
        name + args.tag,
        {"particles": PARTICLES, "blocks": args.blocks, "warm_up": args.warm_up, "rows": rows},
    )


if __name__ == "__main__":
    main()
