"""Posteriors beyond the shipped PosteriorDB five, with exact scores (issue 20, item 3), NumPyro.

Seven regressions of PosteriorDB's kinds, on synthetic data of the originals' sizes and
scales (no downloads): ``earnings`` (earnings on height, unscaled: sds of 1e4 dollars),
``logearn`` (log earnings on height and sex), ``kidiq`` (test score on the mother's IQ:
intercept and slope strongly correlated), ``wells`` (logistic, distance in metres),
``mesquite`` (five predictors, 46 rows), ``radon`` (85 varying intercepts, centered) and
``poisson`` (a log-link GLM with an exposure offset). Flat priors where Stan's models
leave them improper. Reference: NUTS (1,000 warm-up, 3,000 draws). Methods at S = 8
particles an iteration, from NumPyro's default init, AutoMultivariateNormal: ProximalScoreVI
(defaults, Adam 1e-2), ADVI (SVI, Trace_ELBO, Adam 1e-2), GSM, BaM (l = 1). Every
``calls / checks`` score calls, 2,000 guide draws give each parameter's mean error in
reference sds and its sd ratio; "reached" = every |mean error| <= 0.25 and every sd ratio
in [0.6, 1.5] (as ``benchmarks.posteriordb``).

    python -m benchmarks.heldout_posteriors [--names ...] [--methods ...] [--calls 10000]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal

from benchmarks.common import first_in_band, save
from numpyro_psvi import GSM, BaM, ProximalScoreVI

METHODS = ("psvi", "advi", "gsm", "bam")


def _flat(shape: tuple[int, ...] = ()) -> dist.Distribution:
    return dist.ImproperUniform(constraints.real, (), shape)


def earnings(height, earn=None):
    intercept, slope = numpyro.sample("b1", _flat()), numpyro.sample("b2", _flat())
    sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    numpyro.sample("y", dist.Normal(intercept + slope * height, sigma), obs=earn)


def logearn(height, male, log_earn=None):
    coef = numpyro.sample("b", _flat((3,)))
    sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    numpyro.sample("y", dist.Normal(coef[0] + coef[1] * height + coef[2] * male, sigma), obs=log_earn)


def kidiq(mom_iq, kid_score=None):
    intercept, slope = numpyro.sample("b1", _flat()), numpyro.sample("b2", _flat())
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    numpyro.sample("y", dist.Normal(intercept + slope * mom_iq, sigma), obs=kid_score)


def wells(distance, switched=None):
    intercept, slope = numpyro.sample("b1", _flat()), numpyro.sample("b2", _flat())
    numpyro.sample("y", dist.Bernoulli(logits=intercept + slope * distance), obs=switched)


def mesquite(features, log_weight=None):
    coef = numpyro.sample("b", _flat((features.shape[1],)))
    sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    numpyro.sample("y", dist.Normal(features @ coef, sigma), obs=log_weight)


def radon(county, floor, num_counties, log_radon=None):
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 10.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    slope = numpyro.sample("b", dist.Normal(0.0, 10.0))
    sigma_y = numpyro.sample("sigma_y", dist.HalfNormal(1.0))
    with numpyro.plate("counties", num_counties):
        intercepts = numpyro.sample("a", dist.Normal(mu_a, sigma_a))
    numpyro.sample("y", dist.Normal(intercepts[county] + slope * floor, sigma_y), obs=log_radon)


def poisson(features, exposure, counts=None):
    coef = numpyro.sample("b", dist.Normal(jnp.zeros(features.shape[1]), 2.5))
    numpyro.sample("y", dist.Poisson(exposure * jnp.exp(features @ coef)), obs=counts)


def cases(seed: int = 0) -> dict[str, tuple[Callable, tuple]]:
    """``{name: (model, args)}``, the observations last in ``args``."""
    rng = np.random.default_rng(seed)
    height = rng.normal(66.6, 3.8, 1059)
    male = rng.binomial(1, 0.4, 1059).astype(float)
    mom_iq = rng.normal(100.0, 15.0, 434)
    distance = rng.exponential(48.0, 3020)
    features = np.column_stack([np.ones(46), rng.normal(1.2, 0.6, (46, 4))])
    county, floor = rng.integers(0, 85, 919), rng.binomial(1, 0.2, 919).astype(float)
    glm = np.column_stack([np.ones(500), rng.normal(0, 1, 500), rng.binomial(1, 0.5, 500)])
    exposure = rng.uniform(50, 500, 500)
    data = {
        "earnings": (earnings, (height, -61000 + 1300 * height + rng.normal(0, 19000, 1059))),
        "logearn": (logearn, (height, male, 5.8 + 0.06 * height + 0.42 * male + rng.normal(0, 0.88, 1059))),
        "kidiq": (kidiq, (mom_iq, 26 + 0.6 * mom_iq + rng.normal(0, 18, 434))),
        "wells": (wells, (distance, rng.binomial(1, 1 / (1 + np.exp(-(0.6 - 0.0062 * distance)))))),
        "mesquite": (mesquite, (
            features, features @ np.array([5.0, 0.4, 1.1, 0.4, 0.4]) + rng.normal(0, 0.27, 46)
        )),
        "radon": (radon, (
            county, floor, 85, rng.normal(1.5, 0.3, 85)[county] - 0.7 * floor + rng.normal(0, 0.75, 919)
        )),
        "poisson": (poisson, (
            glm, exposure, rng.poisson(exposure * np.exp(glm @ np.array([-3.0, 0.5, -0.4])))
        )),
    }  # fmt: skip
    return {
        name: (model, tuple(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args))
        for name, (model, args) in data.items()
    }


def flatten(draws: dict) -> dict[str, np.ndarray]:
    """``{"site[i]": draws of coordinate i}`` over each site's flattened value."""
    flat = {}
    for name, value in draws.items():
        value = np.asarray(value, np.float64)
        value = value.reshape(value.shape[0], -1)
        for i in range(value.shape[1]):
            flat[f"{name}[{i}]"] = value[:, i]
    return flat


def reference_draws(model: Callable, data: tuple) -> dict[str, np.ndarray]:
    """The NUTS reference (1,000 warm-up, 3,000 draws, key 1), flattened per element."""
    mcmc = MCMC(NUTS(model), num_warmup=1000, num_samples=3000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), *data)
    return flatten(mcmc.get_samples())


def make_engine(method: str, model: Callable, num_particles: int, **psvi_options):
    """The method's engine and guide; ``psvi_options`` go to ``ProximalScoreVI``."""
    guide = AutoMultivariateNormal(model)
    if method == "psvi":
        optim = numpyro.optim.Adam(1e-2)
        return ProximalScoreVI(model, guide, optim, num_particles=num_particles, **psvi_options), guide
    if method == "advi":
        return SVI(model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO(num_particles)), guide
    if method == "gsm":
        return GSM(model, guide, num_particles=num_particles), guide
    return BaM(model, guide, num_particles=num_particles, learning_rate=1.0), guide


def run(
    model, args, reference, method: str, calls: int, checks: int, num_particles: int, **psvi_options
) -> dict:
    ref_mean = {k: v.mean() for k, v in reference.items()}
    ref_std = {k: v.std() for k, v in reference.items()}
    sites = sorted({k.split("[")[0] for k in reference})
    engine, guide = make_engine(method, model, num_particles, **psvi_options)
    state = engine.init(jax.random.PRNGKey(0), *args)
    per_check = calls // num_particles // checks
    chunk = jax.jit(
        lambda s: jax.lax.scan(lambda s, _: engine.update(s, *args), s, None, length=per_check)[0]
    )
    curve = {"calls": [], "max_mean_err": [], "min_sd_ratio": [], "max_sd_ratio": []}
    for check in range(1, checks + 1):
        state = chunk(state)
        params = engine.get_params(state)
        err, low, high = np.inf, np.nan, np.nan
        if all(np.all(np.isfinite(np.asarray(v))) for v in params.values()):
            predictive = Predictive(model, guide=guide, params=params, num_samples=2000, return_sites=sites)
            draws = flatten(predictive(jax.random.PRNGKey(check), *args[:-1]))
            err = max(abs(draws[k].mean() - ref_mean[k]) / ref_std[k] for k in reference)
            ratios = [draws[k].std() / ref_std[k] for k in reference]
            low, high = min(ratios), max(ratios)
        for key, value in zip(curve, (check * per_check * num_particles, err, low, high), strict=True):
            curve[key].append(float(value))
    curve["calls_to_reach"] = first_in_band(*curve.values())
    return curve


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)
    all_cases = cases()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="+", choices=list(all_cases), default=list(all_cases))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--checks", type=int, default=25)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--out", default="heldout_posteriors")
    args = parser.parse_args()
    results = {}
    for name in args.names:
        model, data = all_cases[name]
        reference = reference_draws(model, data)
        results[name] = {}
        for method in args.methods:
            start = time.perf_counter()
            curve = run(model, data, reference, method, args.calls, args.checks, args.particles)
            results[name][method] = curve
            print(
                f"{name:9s} {method:5s} reached at {curve['calls_to_reach']} calls; final max |mean err| "
                f"{curve['max_mean_err'][-1]:.3g}, sd ratio [{curve['min_sd_ratio'][-1]:.3g}, "
                f"{curve['max_sd_ratio'][-1]:.3g}] ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    payload = {"particles": args.particles, "calls": args.calls, "checks": args.checks, "results": results}
    print("wrote", save(args.out, payload))


if __name__ == "__main__":
    main()
