"""Enumerated discrete latents: ProximalScoreVI against SVI(TraceEnum_ELBO), both PPLs.

A model with a discrete latent per data point, summed out by parallel enumeration:
``mu ~ N(0, 3^2)``, ``p ~ Beta(2, 2)``, ``z_i ~ Bernoulli(p)``, ``y_i ~ N(mu + 4 z_i, 1)``,
1,000 points. Its exact posterior of ``(mu, logit p)`` comes from a grid (the Beta's
Jacobian included), so every fit is scored against it: the largest |mean error| of the
AutoNormal guide's ``(mu, logit p)`` in posterior sds and its sd ratios, after 250 /
500 / 1,000 / 2,000 updates of four particles each (equal score calls), with full
batches and with plate subsampling (batches of 100, N/B = 10), at Adam(1e-2) and
Adam(1e-3). Then the time per step, engine over SVI, in interleaved blocks (NumPyro
jitted, torch on one thread).

    python -m benchmarks.enumeration [--seeds 0 1] [--updates 2000] [--backends pyro numpyro]

writes ``benchmarks/results/enumeration.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from scipy.special import logsumexp
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from benchmarks.common import save
from benchmarks.step_cost import _median_block_times

M, SHIFT, PRIOR_SD, BATCH, PARTICLES = 1000, 4.0, 3.0, 100, 4
CHECKPOINTS = (250, 500, 1000, 2000)


def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(0.5 + SHIFT * (rng.random(M) < 0.3), 1.0).astype(np.float32)


def reference(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Posterior means, sds and correlation of ``(mu, logit p)`` on a 601 x 601 grid
    spanning +-8 sds of a coarse first grid's moments (a mean-field guide's best sds are
    the sds times ``sqrt(1 - correlation^2)``)."""

    def moments(mu: np.ndarray, logit: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        p = 1 / (1 + np.exp(-logit))
        first = norm.logpdf(y[None, :], mu[:, None], 1.0)  # (G, M)
        second = norm.logpdf(y[None, :], mu[:, None] + SHIFT, 1.0)
        loglik = np.stack(
            [np.logaddexp(np.log1p(-q) + first, np.log(q) + second).sum(-1) for q in p], axis=1
        )  # (G mu, G logit)
        log_p = (
            loglik
            + norm.logpdf(mu, 0.0, PRIOR_SD)[:, None]
            + (beta_dist.logpdf(p, 2.0, 2.0) + np.log(p) + np.log1p(-p))[None, :]  # dp/dlogit
        )
        weights = np.exp(log_p - logsumexp(log_p))
        means = np.array([weights.sum(1) @ mu, weights.sum(0) @ logit])
        sds = np.sqrt([weights.sum(1) @ (mu - means[0]) ** 2, weights.sum(0) @ (logit - means[1]) ** 2])
        covariance = (mu - means[0]) @ weights @ (logit - means[1])
        return means, sds, float(covariance / sds.prod())

    means, sds, _ = moments(np.linspace(-2.0, 3.0, 201), np.linspace(-4.0, 4.0, 201))
    return moments(*(np.linspace(m - 8 * s, m + 8 * s, 601) for m, s in zip(means, sds, strict=True)))


def errors(loc: np.ndarray, scale: np.ndarray, ref: tuple[np.ndarray, np.ndarray, float]) -> dict:
    mean, sd, _ = ref
    ratios = scale / sd
    return {
        "mean_error_sd": float(np.max(np.abs(loc - mean) / sd)),
        "sd_ratio_min": float(ratios.min()),
        "sd_ratio_max": float(ratios.max()),
    }


# ----------------------------------------------------------------------- NumPyro
def numpyro_model(batch: int | None) -> Callable:
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.funsor import config_enumerate

    @config_enumerate
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        p = numpyro.sample("p", dist.Beta(2.0, 2.0))
        with numpyro.plate("data", M, subsample_size=batch) as i:
            z = numpyro.sample("z", dist.Bernoulli(p))
            numpyro.sample("y", dist.Normal(mu + SHIFT * z, 1.0), obs=y[i])

    return model


def numpyro_steppers(method: str, batch: int | None, lr: float, seed: int, y: np.ndarray):
    """``(step, read)``: one jitted update, and the guide's ``(loc, scale)`` of ``(mu, logit p)``."""
    import jax
    import jax.numpy as jnp
    import numpyro
    from numpyro import handlers
    from numpyro.infer import SVI, TraceEnum_ELBO
    from numpyro.infer.autoguide import AutoNormal

    from numpyro_psvi import ProximalScoreVI

    model = numpyro_model(batch)
    guide = AutoNormal(handlers.block(model, hide=["z"]))
    if method == "svi":
        engine = SVI(model, guide, numpyro.optim.Adam(lr), TraceEnum_ELBO(num_particles=PARTICLES))
    else:
        engine = ProximalScoreVI(model, guide, numpyro.optim.Adam(lr), num_particles=PARTICLES)
    y = jnp.asarray(y)
    state = [engine.init(jax.random.PRNGKey(seed), y)]
    update = jax.jit(lambda s: engine.update(s, y)[0])

    def step() -> None:
        state[0] = update(state[0])
        jax.block_until_ready(state[0])

    def read() -> tuple[np.ndarray, np.ndarray]:
        params = engine.get_params(state[0])  # AutoNormal's locs are unconstrained: logit p's
        loc = np.array([params["mu_auto_loc"], params["p_auto_loc"]], np.float64)
        return loc, np.array([params["mu_auto_scale"], params["p_auto_scale"]], np.float64)

    return step, read


# -------------------------------------------------------------------------- Pyro
def pyro_model(batch: int | None) -> Callable:
    import pyro
    import pyro.distributions as dist
    from pyro.infer import config_enumerate

    @config_enumerate
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("data", M, subsample_size=batch) as i:
            z = pyro.sample("z", dist.Bernoulli(p))
            pyro.sample("y", dist.Normal(mu + SHIFT * z, 1.0), obs=y[i])

    return model


def pyro_steppers(method: str, batch: int | None, lr: float, seed: int, y: np.ndarray):
    import pyro
    import torch
    from pyro import poutine
    from pyro.infer import SVI, TraceEnum_ELBO
    from pyro.infer.autoguide import AutoNormal

    from pyro_psvi import ProximalScoreVI

    store = pyro.get_param_store()
    with store.scope() as scope:  # each fit its own params, steppers interleaved
        pyro.set_rng_seed(seed)
        model = pyro_model(batch)
        guide = AutoNormal(poutine.block(model, hide=["z"]))
        optim = pyro.optim.Adam({"lr": lr})
        if method == "svi":
            elbo = TraceEnum_ELBO(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1)
            engine = SVI(model, guide, optim, elbo)
        else:
            engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES)
    y = torch.as_tensor(y)

    def step() -> None:
        with store.scope(scope):
            engine.step(y)

    def read() -> tuple[np.ndarray, np.ndarray]:
        with store.scope(scope), torch.no_grad():
            loc = np.array([pyro.param(f"AutoNormal.locs.{n}").item() for n in ("mu", "p")])
            scale = np.array([pyro.param(f"AutoNormal.scales.{n}").item() for n in ("mu", "p")])
        return loc, scale

    return step, read


STEPPERS = {"numpyro": numpyro_steppers, "pyro": pyro_steppers}


def fits(backend: str, seeds: list[int], updates: int, y: np.ndarray, ref) -> list[dict]:
    rows = []
    for batch in (None, BATCH):
        for lr in (1e-2, 1e-3):
            for method in ("svi", "psvi"):
                for seed in seeds:
                    step, read = STEPPERS[backend](method, batch, lr, seed, y)
                    row = {"backend": backend, "method": method, "batch": batch, "lr": lr, "seed": seed}
                    for done in range(1, updates + 1):
                        step()
                        if done in CHECKPOINTS:
                            row[str(done)] = errors(*read(), ref)
                    rows.append(row)
                    last = row[str(max(c for c in CHECKPOINTS if c <= updates))]
                    print(
                        backend,
                        method,
                        batch,
                        lr,
                        seed,
                        {k: round(v, 3) for k, v in last.items()},
                        flush=True,
                    )
    return rows


def step_times(backend: str, y: np.ndarray, blocks: int, steps: int) -> list[dict]:
    rows = []
    for batch in (None, BATCH):
        steppers = {method: STEPPERS[backend](method, batch, 1e-2, 0, y)[0] for method in ("svi", "psvi")}
        times = _median_block_times(steppers, blocks, steps, warm_up=50)
        rows.append({"backend": backend, "batch": batch, **times, "ratio": times["psvi"] / times["svi"]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--updates", type=int, default=max(CHECKPOINTS))
    parser.add_argument("--backends", nargs="*", default=["numpyro", "pyro"])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="enumeration")
    parser.add_argument("--no-fits", action="store_true", help="the step times only")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    y = data()
    ref = reference(y)
    print("reference (mu, logit p): means", ref[0], "sds", ref[1], "correlation", ref[2], flush=True)
    rows, times = [], []
    for backend in args.backends:
        rows += [] if args.no_fits else fits(backend, args.seeds, args.updates, y, ref)
        times += step_times(backend, y, args.blocks, args.steps)
    save(
        args.out,
        {
            "reference": {"mean": ref[0].tolist(), "sd": ref[1].tolist(), "correlation": ref[2]},
            "particles": PARTICLES,
            "checkpoints": list(CHECKPOINTS),
            "fits": rows,
            "step_times": times,
        },
    )


if __name__ == "__main__":
    main()
