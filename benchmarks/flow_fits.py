"""Flow guides with exact scores: score calls to the posterior, ProximalScoreVI against SVI
(issue 20, item 4; both backends).

Targets: a Bayesian logistic regression (N = 3000 rows, D = 3 weights with N(0, 1) priors,
full batch; reference: NumPyro's NUTS, 4,000 draws) and a 3-D correlated Gaussian (exact).
Guides: NumPyro's AutoIAFNormal (2 flows, hidden 16-16), Pyro's AutoIAFNormal (2
transforms, hidden 16-16) and an affine-coupling AutoNormalizingFlow (2 layers, the
coordinates flipped after each: a coupling layer passes its first half through unchanged,
so without a permutation those coordinates would keep the base's N(0, 1)); for Pyro also
the IAF with ELU units or in NumPyro's layout (:func:`pyro_guide`). Methods,
S = 4 particles each and the guide's init and Adam(1e-2) shared: ``svi``
(``Trace_ELBO(4)``), ``psvi`` (the engine's defaults) with options after underscores
(``psvi_k20_last``: 20 inner steps, the last iterate; :func:`inner_steps`); a suffix
``_sN`` (``psvi_s8``, ``svi_s8``) runs ``N`` particles instead, for the score calls of the
4-particle runs (fewer updates, checks at the same calls). ``--subsample B`` fits the
regression with its plate subsampled to ``B`` rows (mini-batch scores; the reference stays
the full-data posterior), ``--lr`` sets Adam's rate.
Every ``--every`` updates the guide's means and sds (``--draws`` draws) are compared with
the reference; a fit is in the band when every mean is within 0.2 reference sds and every
sd within 20% of the reference's.

``python -m benchmarks.flow_fits [--backends numpyro pyro] [--seeds 0 1 2] [--out NAME]``
writes ``benchmarks/results/NAME.json`` (default ``flow_fits``) and prints a markdown
table of, per fit: score calls until first in the band, the share of the last half's
checks in it, and the last check's largest mean error (in sds) and sd-ratio range.
"""

from __future__ import annotations

import argparse
import re
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as pdist
import torch
import torch.nn as nn
from numpyro.infer import MCMC, NUTS
from numpyro.infer import SVI as NSVI
from numpyro.infer import Trace_ELBO as NTrace_ELBO
from numpyro.infer.autoguide import AutoIAFNormal as NAutoIAFNormal
from pyro.distributions.transforms import (
    AffineAutoregressive,
    ComposeTransformModule,
    affine_coupling,
    permute,
)
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow
from pyro.nn import AutoRegressiveNN

import numpyro_psvi
import pyro_psvi
from benchmarks.common import machine, save

NUM_PARTICLES = 4
LEARNING_RATE = 1e-2
MEAN_BAND = 0.2  # largest |mean - reference mean| / reference sd
SD_BAND = 0.2  # largest |sd / reference sd - 1|
GAUSSIAN_MEAN = np.array([1.0, -2.0, 0.5])
GAUSSIAN_COV = np.array([[1.0, 0.6, 0.3], [0.6, 0.5, 0.1], [0.3, 0.1, 0.2]])


def logistic_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3)).astype(np.float32)
    logits = x @ np.array([1.0, -2.0, 0.5], np.float32)
    y = (rng.uniform(size=3000) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    return x, y


def numpyro_model(target: str, subsample: int | None = None):
    """The target's model and arguments; the regression's plate subsampled to ``subsample``
    rows when given."""
    if target == "gaussian":
        mean, cov = jnp.asarray(GAUSSIAN_MEAN), jnp.asarray(GAUSSIAN_COV)
        return lambda: numpyro.sample("w", ndist.MultivariateNormal(mean, cov)), ()
    x, y = map(jnp.asarray, logistic_data())

    def model(x, y):
        w = numpyro.sample("w", ndist.Normal(jnp.zeros(3), 1.0).to_event(1))
        with numpyro.plate("data", len(y), subsample_size=subsample) as rows:
            numpyro.sample("y", ndist.Bernoulli(logits=x[rows] @ w), obs=y[rows])

    return model, (x, y)


def pyro_model(target: str, subsample: int | None = None):
    if target == "gaussian":
        mean, cov = (
            torch.tensor(GAUSSIAN_MEAN, dtype=torch.float32),
            torch.tensor(GAUSSIAN_COV, dtype=torch.float32),
        )
        return lambda: pyro.sample("w", pdist.MultivariateNormal(mean, cov)), ()
    x, y = map(torch.tensor, logistic_data())

    def model(x, y):
        w = pyro.sample("w", pdist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(y), subsample_size=subsample, dim=-1) as rows:
            pyro.sample("y", pdist.Bernoulli(logits=(x[rows] * w).sum(-1)), obs=y[rows])  # w: (..., 1, 3)

    return model, (x, y)


def reference(target: str) -> tuple[np.ndarray, np.ndarray]:
    """The posterior's means and sds: exact for the Gaussian, NUTS for the regression."""
    if target == "gaussian":
        return GAUSSIAN_MEAN, np.sqrt(np.diag(GAUSSIAN_COV))
    model, args = numpyro_model(target)
    mcmc = MCMC(NUTS(model), num_warmup=1000, num_samples=4000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), *args)
    draws = np.asarray(mcmc.get_samples()["w"])
    return draws.mean(0), draws.std(0)


def check(draws: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> dict:
    mean, sd = ref
    mean_error = float(np.max(np.abs(draws.mean(0) - mean) / sd))
    ratios = draws.std(0) / sd
    in_band = mean_error <= MEAN_BAND and bool(np.all(np.abs(ratios - 1) <= SD_BAND))
    return {
        "mean_error": mean_error,
        "sd_ratio_min": float(ratios.min()),
        "sd_ratio_max": float(ratios.max()),
        "in_band": in_band,
    }


def numpyro_fit(
    target: str,
    method: str,
    seed: int,
    updates: int,
    every: int,
    num_draws: int,
    ref,
    subsample: int | None = None,
    lr: float = LEARNING_RATE,
) -> list[dict]:
    model, args = numpyro_model(target, subsample)
    guide = NAutoIAFNormal(model, num_flows=2, hidden_dims=[16, 16])
    optim = numpyro.optim.Adam(lr)
    method, num_particles = particles(method)
    if method == "svi":
        engine = NSVI(model, guide, optim, NTrace_ELBO(num_particles))
    else:
        engine = numpyro_psvi.ProximalScoreVI(
            model, guide, optim, num_particles=num_particles, **inner_steps(method)
        )
    state = engine.init(jax.random.PRNGKey(seed), *args)
    update = jax.jit(engine.update)
    sample = jax.jit(lambda key, params: guide.sample_posterior(key, params, sample_shape=(num_draws,))["w"])
    checks, start = [], time.perf_counter()
    for step in range(1, updates + 1):
        state, _ = update(state, *args)
        if step % every == 0:
            draws = np.asarray(sample(jax.random.PRNGKey(10_000 + step), engine.get_params(state)))
            checks.append(
                {"calls": step * num_particles, "seconds": time.perf_counter() - start, **check(draws, ref)}
            )
    return checks


def pyro_guide(kind: str, model):
    """``iaf``: Pyro's AutoIAFNormal (ReLU units, each layer's order drawn at random);
    ``iaf_elu``: the same with ELU units; ``iaf_ordered``: ReLU units in NumPyro's
    layout (each layer in the coordinates' order, reversed after each); ``coupling``:
    :func:`coupling_flow`."""
    if kind == "iaf":
        return AutoIAFNormal(model, hidden_dim=[16, 16], num_transforms=2)
    if kind == "iaf_elu":
        return AutoNormalizingFlow(model, partial(autoregressive_flow, nonlinearity=nn.ELU, ordered=False))
    if kind == "iaf_ordered":
        return AutoNormalizingFlow(model, partial(autoregressive_flow, nonlinearity=nn.ReLU, ordered=True))
    return AutoNormalizingFlow(model, coupling_flow)


def autoregressive_flow(dim: int, nonlinearity: type[nn.Module], ordered: bool) -> ComposeTransformModule:
    """Two affine autoregressive layers (hidden 16-16) with ``nonlinearity`` units; with
    ``ordered``, each in the coordinates' order and followed by a flip of them (NumPyro's
    AutoIAFNormal), else each in an order drawn at random (Pyro's)."""
    flip = permute(dim, torch.arange(dim - 1, -1, -1))
    layers = []
    for _ in range(2):
        order = torch.arange(dim) if ordered else None
        network = AutoRegressiveNN(dim, [16, 16], nonlinearity=nonlinearity(), permutation=order)
        layers += [AffineAutoregressive(network), flip] if ordered else [AffineAutoregressive(network)]
    return ComposeTransformModule(layers)


def coupling_flow(dim: int) -> ComposeTransformModule:
    """Two affine coupling layers (hidden 16-16), each followed by a flip of the coordinates."""
    flip = permute(dim, torch.arange(dim - 1, -1, -1))
    layers = [(affine_coupling(dim, hidden_dims=[16, 16]), flip) for _ in range(2)]
    return ComposeTransformModule([t for layer in layers for t in layer])


def pyro_fit(
    target: str,
    kind: str,
    method: str,
    seed: int,
    updates: int,
    every: int,
    num_draws: int,
    ref,
    subsample: int | None = None,
    lr: float = LEARNING_RATE,
) -> list[dict]:
    model, args = pyro_model(target, subsample)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = pyro_guide(kind, model)
    guide(*args)  # build the flow under this seed, whatever the engine
    pyro.set_rng_seed(seed)
    optim = pyro.optim.Adam({"lr": lr})
    method, num_particles = particles(method)
    if method == "svi":
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=num_particles, vectorize_particles=True))
    else:
        engine = pyro_psvi.ProximalScoreVI(
            model, guide, optim, num_particles=num_particles, **inner_steps(method)
        )
    checks, start = [], time.perf_counter()
    for step in range(1, updates + 1):
        engine.step(*args)
        if step % every == 0:
            with torch.no_grad(), pyro.plate("draws", num_draws):
                draws = guide(*args)["w"].numpy()
            checks.append(
                {"calls": step * num_particles, "seconds": time.perf_counter() - start, **check(draws, ref)}
            )
    return checks


def particles(method: str) -> tuple[str, int]:
    """A method name without its ``_sN`` suffix and its particles: ``N``, else 4."""
    found = re.fullmatch(r"(.+)_s(\d+)", method)
    return (found[1], int(found[2])) if found else (method, NUM_PARTICLES)


def at_equal_calls(method: str, updates: int, every: int) -> tuple[int, int]:
    """The updates and check interval of ``method`` that spend the score calls of
    ``updates`` and ``every`` updates at 4 particles."""
    scale = NUM_PARTICLES / particles(method)[1]
    return max(round(updates * scale), 1), max(round(every * scale), 1)


def inner_steps(method: str) -> dict:
    """The engine's options of ``method``: ``psvi``, the defaults, then any of ``_kN``
    (``inner_steps=N``), ``_avg`` (``average_iterates=True``) and ``_last``
    (``average_iterates=False``), e.g. ``psvi_k20_last``."""
    options = {}
    for token in method.split("_")[1:]:
        if re.fullmatch(r"k\d+", token):
            options["inner_steps"] = int(token[1:])
        elif token in ("avg", "last"):
            options["average_iterates"] = token == "avg"
        else:
            raise SystemExit(f"{method}: unknown option {token!r}; use _kN, _avg or _last")
    return options


def summary(checks: list[dict]) -> dict:
    first = next((c["calls"] for c in checks if c["in_band"]), None)
    late = checks[len(checks) // 2 :]
    last = checks[-1]
    return {
        "calls_to_band": first,
        "late_share_in_band": sum(c["in_band"] for c in late) / len(late),
        "final_mean_error": last["mean_error"],
        "final_sd_ratio": [last["sd_ratio_min"], last["sd_ratio_max"]],
        "seconds": last["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["numpyro", "pyro"])
    parser.add_argument("--targets", nargs="+", default=["logistic", "gaussian"])
    parser.add_argument("--methods", nargs="+", default=["svi", "psvi", "psvi_k20"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--pyro-k20-updates", type=int, default=300,
                        help="Pyro's K = 20 flows take seconds per update: a shorter run")  # fmt: skip
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument(
        "--pyro-guides", nargs="+", default=["iaf", "coupling"],
        choices=["iaf", "iaf_elu", "iaf_ordered", "coupling"],
    )  # fmt: skip
    parser.add_argument("--out", default="flow_fits", help="name of the JSON in benchmarks/results")
    parser.add_argument("--subsample", type=int, help="the regression's plate subsampled to this many rows")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help="Adam's rate")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    setting = {"num_draws": opts.draws, "subsample": opts.subsample, "lr": opts.lr}
    rows = []
    for target in opts.targets:
        ref = reference(target)
        fits = [("numpyro", "iaf")] if "numpyro" in opts.backends else []
        fits += [("pyro", kind) for kind in opts.pyro_guides] if "pyro" in opts.backends else []
        for backend, kind in fits:
            for method in opts.methods:
                for seed in opts.seeds:
                    if backend == "numpyro":
                        updates, every = at_equal_calls(method, opts.updates, opts.every)
                        checks = numpyro_fit(target, method, seed, updates, every, ref=ref, **setting)
                    else:
                        updates = opts.pyro_k20_updates if method == "psvi_k20" else opts.updates
                        updates, every = at_equal_calls(method, updates, opts.every)
                        checks = pyro_fit(target, kind, method, seed, updates, every, ref=ref, **setting)
                    row = {
                        "target": target,
                        "backend": backend,
                        "guide": kind,
                        "method": method,
                        "seed": seed,
                    }
                    rows.append({**row, **summary(checks), "checks": checks})
                    print(row, summary(checks), flush=True)
    save(opts.out, {"machine": machine(), "num_particles": NUM_PARTICLES, "lr": opts.lr,
                    "subsample": opts.subsample, "rows": rows})  # fmt: skip
    columns = "calls to band (per seed) | late share in band | final mean error (sd) | final sd ratios"
    print(f"\n| target | backend | guide | method | {columns} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    keys = sorted({(r["target"], r["backend"], r["guide"], r["method"]) for r in rows}, key=str)
    for key in keys:
        group = [r for r in rows if (r["target"], r["backend"], r["guide"], r["method"]) == key]
        calls = ", ".join("-" if r["calls_to_band"] is None else str(r["calls_to_band"]) for r in group)
        share = ", ".join(f"{r['late_share_in_band']:.2f}" for r in group)
        error = ", ".join(f"{r['final_mean_error']:.2f}" for r in group)
        ratios = ", ".join(f"{r['final_sd_ratio'][0]:.2f}-{r['final_sd_ratio'][1]:.2f}" for r in group)
        print(f"| {' | '.join(key)} | {calls} | {share} | {error} | {ratios} |")


if __name__ == "__main__":
    main()
