"""PosteriorDB study with exact (full-data) scores (the paper's Figure 5), NumPyro.

Methods at equal S particles per iteration: ProximalScoreVI with full-rank and
diagonal Gaussian guides (defaults, Adam 1e-2), ADVI (SVI, Trace_ELBO, full rank,
Adam 1e-2), GSM and BaM (l = 1). At each checkpoint, 1,000 draws of the guide give
per reference parameter the error of the mean in reference standard deviations and
the ratio of standard deviations. "Reached" = every |mean error| <= 0.25 and every
sd ratio in [0.6, 1.5].

    python -m benchmarks.posteriordb [--calls 16000] [--checks 20] [--particles 8]
        [--names ...] [--methods psvi_full ...] [--out posteriordb]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import jax
import numpy as np
import numpyro
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal

from benchmarks.common import first_in_band, save
from numpyro_psvi import GSM, BaM, ProximalScoreVI
from numpyro_psvi.contrib.posteriordb import MODELS
from psvi.contrib import posteriordb
from psvi.contrib.plots import plot_curves

DOCS = Path(__file__).parent.parent / "docs"
METHODS = ("psvi_full", "psvi_diag", "advi", "gsm", "bam")


def make_engine(method: str, model, num_particles: int, **psvi_options):
    """The method's engine and guide; ``psvi_options`` go to ``ProximalScoreVI``."""
    guide = (AutoDiagonalNormal if method == "psvi_diag" else AutoMultivariateNormal)(model)
    if method.startswith("psvi"):
        optim = numpyro.optim.Adam(1e-2)
        engine = ProximalScoreVI(model, guide, optim, num_particles=num_particles, **psvi_options)
    elif method == "advi":
        engine = SVI(model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO(num_particles))
    elif method == "gsm":
        engine = GSM(model, guide, num_particles=num_particles)
    else:
        engine = BaM(model, guide, num_particles=num_particles, learning_rate=1.0)
    return engine, guide


def errors(model, guide, params, post: posteriordb.Posterior, key) -> tuple[float, float, float]:
    """Max |mean error| in reference sds, and the min and max sd ratio."""
    sites = sorted({name.split("[")[0] for name in post.reference_mean})
    draws = Predictive(model, guide=guide, params=params, num_samples=1000, return_sites=sites)(
        key, post.data
    )
    flat = posteriordb.flatten({k: np.asarray(v, np.float64) for k, v in draws.items()})
    ref_mean, ref_std = post.reference_mean, post.reference_std
    mean_err = [abs(flat[k].mean() - ref_mean[k]) / ref_std[k] for k in ref_mean]
    ratio = [flat[k].std() / ref_std[k] for k in ref_mean]
    return float(np.max(mean_err)), float(np.min(ratio)), float(np.max(ratio))


def run(
    name: str, method: str, calls: int, checks: int, num_particles: int, seed: int = 0, **psvi_options
) -> dict:
    post = posteriordb.load(name)
    model = MODELS[name]
    engine, guide = make_engine(method, model, num_particles, **psvi_options)
    state = engine.init(jax.random.PRNGKey(seed), post.data)
    per_check = max(calls // num_particles // checks, 1)
    chunk = jax.jit(
        lambda s: jax.lax.scan(lambda s, _: engine.update(s, post.data), s, None, length=per_check)[0]
    )
    curve = {"calls": [], "max_mean_err": [], "min_sd_ratio": [], "max_sd_ratio": []}
    for check in range(1, checks + 1):
        state = chunk(state)
        params = engine.get_params(state)
        finite = all(np.all(np.isfinite(np.asarray(v))) for v in params.values())
        err, lo, hi = (
            errors(model, guide, params, post, jax.random.PRNGKey(seed + check))
            if finite
            else (np.inf, np.nan, np.nan)
        )
        curve["calls"].append(check * per_check * num_particles)
        curve["max_mean_err"].append(err)
        curve["min_sd_ratio"].append(lo)
        curve["max_sd_ratio"].append(hi)
    curve["calls_to_reach"] = first_in_band(*curve.values())
    return curve


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=16000)
    parser.add_argument("--checks", type=int, default=20)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--names", nargs="+", default=list(posteriordb.NAMES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", default="posteriordb")
    args = parser.parse_args()
    results = {}
    for name in args.names:
        try:
            posteriordb.load(name)
        except FileNotFoundError as error:
            print(f"skip {name}: {error}")
            continue
        results[name] = {}
        for method in args.methods:
            curve = run(name, method, args.calls, args.checks, args.particles)
            results[name][method] = curve
            print(
                f"{name:42s} {method:10s} reached at {curve['calls_to_reach']} calls; final max "
                f"|mean err| {curve['max_mean_err'][-1]:.3g} sd ratio "
                f"[{curve['min_sd_ratio'][-1]:.3g}, {curve['max_sd_ratio'][-1]:.3g}]",
                flush=True,
            )
        if args.out != "posteriordb":  # a partial rerun: the plots stay those of the full table
            continue
        plot_curves(
            {m: (c["calls"], np.clip(c["max_mean_err"], 1e-3, 1e3)) for m, c in results[name].items()},
            "score calls",
            "max |mean error| / reference sd",
            name,
            str(DOCS / f"posteriordb_{name.split('-')[-1]}.png"),
            logy=True,
        )
    print("wrote", save(args.out, {"particles": args.particles, "calls": args.calls, "results": results}))


if __name__ == "__main__":
    main()
