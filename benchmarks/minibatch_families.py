"""User-written guides of non-Gaussian families under mini-batch scores (issue 19, item 1),
on conjugate targets whose posterior is exact.

Two one-latent models with a subsampled plate (N = 2,000 observations, B = ``--batch``
at a time, 100 by default; ProximalScoreVI reshuffles the batches, SVI takes the plate's
own): a Normal likelihood's precision ``tau ~ Gamma(2, 2)`` (posterior Gamma) and a
coin's bias ``p ~ Beta(2, 2)`` (posterior Beta). Each fitted with three user-written
guides: the conjugate family (``conjugate``: ``Gamma(a, b)``, ``Beta(a, b)``, params
started at 5), the same family and start parameterized by its mean and shape
(``conjugate_mean``: ``Gamma(k, k / m)``, ``Beta(k m, k (1 - m))``) and a Normal on the
site's unconstrained value (``normal``: ``LogNormal``; a ``Normal`` pushed through the
sigmoid), params started at ``loc = 0, scale = 0.5``. Methods: ProximalScoreVI with its defaults and
``SVI(Trace_ELBO(4))`` (the same score calls), the user's Adam at each ``--lrs``, seeds 0 ..
``--seeds`` - 1; ``--prox-weights``, ``--average`` and ``--inner-steps`` set the engine's
options instead of its defaults (the weight's study). Reported: the error of the fitted mean of the
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

from benchmarks.common import add_engine_setting_arguments, engine_settings, row_method_label, save
from psvi.contrib.targets import (
    conjugate_data,
    conjugate_mean_args,
    conjugate_posterior,
    conjugate_unconstrained_moments,
)

BATCH = 100
TARGETS = ("precision", "coin")
GUIDES = ("conjugate", "conjugate_mean", "normal")
PARTICLES = 4


def target_data(target: str):
    """The target's N = 2,000 observations (:func:`psvi.contrib.targets.conjugate_data`)."""
    return conjugate_data()[TARGETS.index(target)]


def fitted_moments(target: str, guide: str, params: dict) -> tuple[float, float]:
    values = {name: float(value) for name, value in params.items()}
    if guide == "conjugate":
        return conjugate_unconstrained_moments(target, values["a"], values["b"])
    if guide == "conjugate_mean":
        return conjugate_unconstrained_moments(target, *conjugate_mean_args(target, values["k"], values["m"]))
    return values["loc"], values["scale"]


def numpyro_fit(
    target: str,
    guide_name: str,
    method: str,
    lr: float,
    seed: int,
    updates: int,
    batch: int,
    engine_options: dict,
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_psvi import ProximalScoreVI
    from numpyro_psvi.contrib.models import CONJUGATE_TARGET_GUIDES, coin_model, precision_model

    model = precision_model if target == "precision" else coin_model
    guide = CONJUGATE_TARGET_GUIDES[guide_name](target)
    optim = numpyro.optim.Adam(lr)
    if method == "svi":
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, **engine_options)
    data = jnp.asarray(target_data(target))
    start = time.perf_counter()
    result = engine.run(jax.random.PRNGKey(seed), updates, data, subsample_size=batch, progress_bar=False)
    return {"params": result.params, "seconds": time.perf_counter() - start}


def pyro_fit(
    target: str,
    guide_name: str,
    method: str,
    lr: float,
    seed: int,
    updates: int,
    batch: int,
    engine_options: dict,
) -> dict:
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import CONJUGATE_TARGET_GUIDES, coin_model, precision_model

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = precision_model if target == "precision" else coin_model
    guide = CONJUGATE_TARGET_GUIDES[guide_name](target)
    optim = pyro.optim.Adam({"lr": lr})
    if method == "svi":
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, **engine_options)
    data = torch.tensor(target_data(target))
    start = time.perf_counter()
    for _ in range(updates):
        engine.step(data, subsample_size=batch)
    seconds = time.perf_counter() - start
    store = pyro.get_param_store()
    return {"params": {name: store[name].detach() for name in store.keys()}, "seconds": seconds}


FITS = {"numpyro": numpyro_fit, "pyro": pyro_fit}


def row_of(
    backend: str, target: str, guide: str, lr: float, method: str, engine_options: dict, options
) -> dict:
    """One configuration's fits over the seeds, against the exact posterior."""
    mean, sd = conjugate_unconstrained_moments(target, *conjugate_posterior(target, target_data(target)))
    runs = []
    for seed in range(options.seeds):
        fit = FITS[backend](target, guide, method, lr, seed, options.updates, options.batch, engine_options)
        loc, scale = fitted_moments(target, guide, fit["params"])
        runs.append({"mean_err": (loc - mean) / sd, "sd_ratio": scale / sd, "seconds": fit["seconds"]})
    config = {"backend": backend, "target": target, "guide": guide, "lr": lr, "method": method}
    return {**config, **engine_options, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["numpyro"], choices=sorted(FITS))
    parser.add_argument("--methods", nargs="+", default=["psvi", "svi"], choices=["psvi", "svi"])
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=GUIDES)
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=BATCH, help="the plate's subsample size B")
    add_engine_setting_arguments(parser)
    parser.add_argument("--out", default="minibatch_families")
    options = parser.parse_args()
    rows = []
    configs = itertools.product(options.backends, TARGETS, options.guides, options.lrs, options.methods)
    for *config, method in configs:
        for engine_options in engine_settings(options) if method == "psvi" else [{}]:
            rows.append(row_of(*config, method, engine_options, options))
            cells = [(round(run["mean_err"], 2), round(run["sd_ratio"], 2)) for run in rows[-1]["runs"]]
            print(*config, method, engine_options, cells, flush=True)
    payload = {
        "updates": options.updates,
        "num": len(target_data("coin")),
        "batch": options.batch,
        "particles": PARTICLES,
    }
    save(options.out, {**payload, "rows": rows})
    columns = ("backend", "target", "guide", "Adam lr", "method", "mean error (sd)", "sd ratio")
    print("\n| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        errors = ", ".join(f"{run['mean_err']:.2f}" for run in row["runs"])
        ratios = ", ".join(f"{run['sd_ratio']:.2f}" for run in row["runs"])
        method = row_method_label(row)
        cells = (row["backend"], row["target"], row["guide"], row["lr"], method, errors, ratios)
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
