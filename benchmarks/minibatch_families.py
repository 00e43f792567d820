"""User-written guides of non-Gaussian families under mini-batch scores (issue 19, item 1),
on conjugate targets whose posterior is exact.

Two one-latent models with a subsampled plate (N = 2,000 observations, B = ``--batch``
at a time, 100 by default; ProximalScoreVI reshuffles the batches, SVI takes the plate's
own): a Normal likelihood's precision ``tau ~ Gamma(2, 2)`` (posterior Gamma) and a
coin's bias ``p ~ Beta(2, 2)`` (posterior Beta). Each fitted with two user-written guides:
the conjugate family (``Gamma(a, b)``, ``Beta(a, b)``, params started at 5) and a Normal on
the site's unconstrained value (``LogNormal``; a ``Normal`` pushed through the sigmoid),
params started at ``loc = 0, scale = 0.5``. Methods: ProximalScoreVI with its defaults and
``SVI(Trace_ELBO(4))`` (the same score calls), the user's Adam at each ``--lrs``, seeds 0 ..
``--seeds`` - 1; ``--prox-weights`` and ``--average`` set the engine's options instead of
its defaults (the weight's study). Reported: the error of the fitted mean of the
unconstrained value (``log tau``, ``logit p``) in exact posterior sds and the ratio of the
fitted sd to the exact one, both in closed form (``digamma``/``trigamma`` for the
conjugate families).

    python -m benchmarks.minibatch_families [--backends numpyro pyro] [--updates 3000] [--batch 100]
        [--prox-weights 10 100] [--average default on off]

writes ``benchmarks/results/minibatch_families.json`` (``--out``) and prints the table for
docs/minibatch.md, section 15.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from scipy.special import digamma, polygamma

from benchmarks.common import save

NUM, BATCH, PRIOR = 2_000, 100, 2.0
TARGETS = ("precision", "coin")
GUIDES = ("conjugate", "normal")
PARTICLES = 4


def data() -> tuple[np.ndarray, np.ndarray]:
    """The precision target's observations (sd 0.5) and the coin's flips (bias 0.3)."""
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 0.5, NUM).astype(np.float32), (rng.random(NUM) < 0.3).astype(np.float32)


def exact_moments(target: str, y: np.ndarray, flips: np.ndarray) -> tuple[float, float]:
    """The exact posterior's mean and sd of ``log tau`` or ``logit p``."""
    if target == "precision":
        squares = float(np.sum(y.astype(np.float64) ** 2))
        return conjugate_moments(target, PRIOR + NUM / 2, PRIOR + squares / 2)
    heads = float(flips.sum())
    return conjugate_moments(target, PRIOR + heads, PRIOR + NUM - heads)


def conjugate_moments(target: str, a: float, b: float) -> tuple[float, float]:
    """Mean and sd of ``log tau`` for ``tau ~ Gamma(a, b)``, of ``logit p`` for ``p ~ Beta(a, b)``."""
    if target == "precision":
        return float(digamma(a) - np.log(b)), float(np.sqrt(polygamma(1, a)))
    return float(digamma(a) - digamma(b)), float(np.sqrt(polygamma(1, a) + polygamma(1, b)))


def fitted_moments(target: str, guide: str, params: dict) -> tuple[float, float]:
    values = {name: float(value) for name, value in params.items()}
    if guide == "conjugate":
        return conjugate_moments(target, values["a"], values["b"])
    return values["loc"], values["scale"]


def numpyro_fit(
    target: str, guide_name: str, method: str, lr: float, seed: int, updates: int, engine_options: dict
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_psvi import ProximalScoreVI

    y, flips = map(jnp.asarray, data())
    site = "tau" if target == "precision" else "p"

    def model(y, flips):
        if target == "precision":
            tau = numpyro.sample("tau", dist.Gamma(PRIOR, PRIOR))
            with numpyro.plate("data", NUM, subsample_size=BATCH) as idx:
                numpyro.sample("obs", dist.Normal(0.0, 1.0 / jnp.sqrt(tau)), obs=y[idx])
        else:
            p = numpyro.sample("p", dist.Beta(PRIOR, PRIOR))
            with numpyro.plate("data", NUM, subsample_size=BATCH) as idx:
                numpyro.sample("obs", dist.Bernoulli(p), obs=flips[idx])

    def guide(y, flips):
        if guide_name == "conjugate":
            a = numpyro.param("a", 5.0, constraint=constraints.positive)
            b = numpyro.param("b", 5.0, constraint=constraints.positive)
            numpyro.sample(site, dist.Gamma(a, b) if target == "precision" else dist.Beta(a, b))
            return
        loc = numpyro.param("loc", 0.0)
        scale = numpyro.param("scale", 0.5, constraint=constraints.positive)
        if target == "precision":
            numpyro.sample(site, dist.LogNormal(loc, scale))
        else:
            logistic = dist.transforms.SigmoidTransform()
            numpyro.sample(site, dist.TransformedDistribution(dist.Normal(loc, scale), logistic))

    optim = numpyro.optim.Adam(lr)
    if method == "svi":
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, **engine_options)
    start = time.perf_counter()
    result = engine.run(jax.random.PRNGKey(seed), updates, y, flips, progress_bar=False)
    return {"params": result.params, "seconds": time.perf_counter() - start}


def pyro_fit(
    target: str, guide_name: str, method: str, lr: float, seed: int, updates: int, engine_options: dict
) -> dict:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from torch.distributions import constraints

    from pyro_psvi import ProximalScoreVI

    y, flips = map(torch.tensor, data())
    site = "tau" if target == "precision" else "p"

    def model(y, flips):
        if target == "precision":
            tau = pyro.sample("tau", dist.Gamma(PRIOR, PRIOR))
            with pyro.plate("data", NUM, subsample_size=BATCH) as idx:
                pyro.sample("obs", dist.Normal(0.0, tau.rsqrt()), obs=y[idx])
        else:
            p = pyro.sample("p", dist.Beta(PRIOR, PRIOR))
            with pyro.plate("data", NUM, subsample_size=BATCH) as idx:
                pyro.sample("obs", dist.Bernoulli(p), obs=flips[idx])

    def guide(y, flips):
        if guide_name == "conjugate":
            a = pyro.param("a", torch.tensor(5.0), constraint=constraints.positive)
            b = pyro.param("b", torch.tensor(5.0), constraint=constraints.positive)
            pyro.sample(site, dist.Gamma(a, b) if target == "precision" else dist.Beta(a, b))
            return
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(0.5), constraint=constraints.positive)
        if target == "precision":
            pyro.sample(site, dist.LogNormal(loc, scale))
        else:
            logistic = dist.transforms.SigmoidTransform()
            pyro.sample(site, dist.TransformedDistribution(dist.Normal(loc, scale), [logistic]))

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = pyro.optim.Adam({"lr": lr})
    if method == "svi":
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, **engine_options)
    start = time.perf_counter()
    for _ in range(updates):
        engine.step(y, flips)
    seconds = time.perf_counter() - start
    store = pyro.get_param_store()
    return {"params": {name: store[name].detach() for name in store.keys()}, "seconds": seconds}


FITS = {"numpyro": numpyro_fit, "pyro": pyro_fit}


def row_of(
    backend: str, target: str, guide: str, lr: float, method: str, engine_options: dict, options
) -> dict:
    """One configuration's fits over the seeds, against the exact posterior."""
    mean, sd = exact_moments(target, *data())
    runs = []
    for seed in range(options.seeds):
        fit = FITS[backend](target, guide, method, lr, seed, options.updates, engine_options)
        loc, scale = fitted_moments(target, guide, fit["params"])
        runs.append({"mean_err": (loc - mean) / sd, "sd_ratio": scale / sd, "seconds": fit["seconds"]})
    config = {"backend": backend, "target": target, "guide": guide, "lr": lr, "method": method}
    return {**config, **engine_options, "runs": runs}


def engine_settings(options) -> list[dict]:
    """The engine's options of each ``--prox-weights`` x ``--average`` pair (the
    defaults: none given)."""
    settings = []
    for weight, average in itertools.product(options.prox_weights, options.average):
        chosen = {"prox_weight": weight, "average_iterates": {"on": True, "off": False}.get(average)}
        settings.append({name: value for name, value in chosen.items() if value is not None})
    return settings


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["numpyro"], choices=sorted(FITS))
    parser.add_argument("--methods", nargs="+", default=["psvi", "svi"], choices=["psvi", "svi"])
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=GUIDES)
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=BATCH, help="the plate's subsample size B")
    parser.add_argument("--prox-weights", type=float, nargs="+", default=[None], help="ProximalScoreVI only")
    parser.add_argument("--average", nargs="+", default=["default"], choices=["default", "on", "off"])
    parser.add_argument("--out", default="minibatch_families")
    options = parser.parse_args()
    BATCH = options.batch
    rows = []
    configs = itertools.product(options.backends, TARGETS, options.guides, options.lrs, options.methods)
    for *config, method in configs:
        for engine_options in engine_settings(options) if method == "psvi" else [{}]:
            rows.append(row_of(*config, method, engine_options, options))
            cells = [(round(run["mean_err"], 2), round(run["sd_ratio"], 2)) for run in rows[-1]["runs"]]
            print(*config, method, engine_options, cells, flush=True)
    payload = {"updates": options.updates, "num": NUM, "batch": BATCH, "particles": PARTICLES}
    save(options.out, {**payload, "rows": rows})
    columns = ("backend", "target", "guide", "Adam lr", "method", "mean error (sd)", "sd ratio")
    print("\n| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        errors = ", ".join(f"{run['mean_err']:.2f}" for run in row["runs"])
        ratios = ", ".join(f"{run['sd_ratio']:.2f}" for run in row["runs"])
        settings = ", ".join(
            f"{name} {row[name]}" for name in ("prox_weight", "average_iterates") if name in row
        )
        method = f"{row['method']} ({settings})" if settings else row["method"]
        cells = (row["backend"], row["target"], row["guide"], row["lr"], method, errors, ratios)
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
