"""Far starts with exact scores (issue 20, item 3): earnings in dollars from the PPLs' inits.

The earnings regression (``earnings_regression`` of the backends' ``contrib.models`` on
:func:`psvi.contrib.targets.earnings_data`: 1,059 rows; coefficients with Normal(0, 1e6)
priors, sigma ~ LogNormal(0, 10)), AutoMultivariateNormal,
S = 8, Adam 1e-2, in both backends (float32, the PPLs' default), started by
``init_to_median`` (Pyro's autoguide default: coefficients drawn ~4e5 from their priors,
sigma ~0.7 against ~19,500), ``init_to_uniform`` (NumPyro's default) and
``init_to_feasible``. Every 20 updates the guide's means and sds are compared with the
flat-prior posterior (:func:`~psvi.contrib.targets.earnings_posterior`; the priors move
means by ~5e-4 sd): "reached" = every |mean error| <= 0.25 sd and every sd ratio in
[0.6, 1.5] (as ``benchmarks.posteriordb``). ``--growth-cap`` sets
``psvi.objective.MAX_TRUST_REGION_GROWTH`` for the run (how the cap was measured);
``--averaged`` fits with ``benchmarks.closed_form_damping``'s "(3, averaged)" settings
(``prox_weight=3, average_iterates=True``) instead of the engine's defaults.

    python -m benchmarks.far_starts [--updates 600] [--growth-cap 1024] [--averaged] [--out far_starts]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator

import numpy as np

import psvi.objective
from benchmarks.common import band_errors, first_in_band, save
from psvi.contrib.targets import earnings_data, earnings_posterior

INITS = ("init_to_median", "init_to_uniform", "init_to_feasible")
CHECK_EVERY = 20


def pyro_fit(init: str, updates: int, **options) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """The guide's unconstrained (loc, sd) and the rejections so far, every ``CHECK_EVERY``
    updates of a Pyro fit (``options`` for the engine)."""
    import pyro
    import torch
    from pyro.infer import autoguide

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import earnings_regression as model

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = tuple(torch.tensor(v, dtype=torch.float32) for v in earnings_data())
    guide = autoguide.AutoMultivariateNormal(model, init_loc_fn=getattr(autoguide, init))
    engine = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8, **options)
    for _ in range(updates // CHECK_EVERY):
        for _ in range(CHECK_EVERY):
            engine.step(*data)
        posterior = guide.get_posterior()
        cov = posterior.covariance_matrix.detach().double().numpy()
        yield posterior.loc.detach().double().numpy(), np.sqrt(np.diag(cov)), engine.num_rejected


def numpyro_fit(init: str, updates: int, **options) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """As :func:`pyro_fit`, NumPyro (``run``'s update, jitted in chunks)."""
    import jax
    import jax.numpy as jnp
    import numpyro
    from numpyro.infer import initialization
    from numpyro.infer.autoguide import AutoMultivariateNormal

    from numpyro_psvi import ProximalScoreVI
    from numpyro_psvi.contrib.models import earnings_regression as model

    data = tuple(jnp.asarray(v) for v in earnings_data())
    guide = AutoMultivariateNormal(model, init_loc_fn=getattr(initialization, init))
    engine = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2), num_particles=8, **options)
    state = engine.init(jax.random.PRNGKey(0), *data)
    chunk = jax.jit(
        lambda s: jax.lax.scan(lambda s, _: engine.update(s, *data), s, None, length=CHECK_EVERY)[0]
    )
    for _ in range(updates // CHECK_EVERY):
        state = chunk(state)
        posterior = guide.get_posterior(engine.get_params(state))
        cov = np.asarray(posterior.covariance_matrix, np.float64)
        yield np.asarray(posterior.loc, np.float64), np.sqrt(np.diag(cov)), int(state.num_rejected)


def run(backend: str, init: str, updates: int, **options) -> dict:
    reference = earnings_posterior(*earnings_data())
    fit = pyro_fit if backend == "pyro" else numpyro_fit
    curve = {"updates": [], "max_mean_err": [], "min_sd_ratio": [], "max_sd_ratio": [], "rejected": []}
    start = time.perf_counter()
    for check, (loc, sd, rejected) in enumerate(fit(init, updates, **options), start=1):
        err, low, high = (
            band_errors(loc, sd, reference) if np.all(np.isfinite(sd)) else (np.inf, np.nan, np.nan)
        )
        for key, value in zip(curve, (check * CHECK_EVERY, err, low, high, rejected), strict=True):
            curve[key].append(value)
    curve["seconds"] = time.perf_counter() - start
    curve["updates_to_reach"] = first_in_band(*list(curve.values())[:4])
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=600)
    parser.add_argument("--growth-cap", type=float, default=psvi.objective.MAX_TRUST_REGION_GROWTH)
    parser.add_argument("--backends", nargs="+", choices=("pyro", "numpyro"), default=["pyro", "numpyro"])
    parser.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    parser.add_argument("--averaged", action="store_true")
    parser.add_argument("--out", default="far_starts")
    args = parser.parse_args()
    options = {"prox_weight": 3.0, "average_iterates": True} if args.averaged else {}
    psvi.objective.MAX_TRUST_REGION_GROWTH = args.growth_cap  # read at each update
    warnings.simplefilter("ignore", RuntimeWarning)  # rejected updates: counted in the curve
    results = {}
    for backend in args.backends:
        for init in args.inits:
            try:
                curve = run(backend, init, args.updates, **options)
            except RuntimeError as error:  # a fit stuck: max_consecutive_rejections
                curve = {"error": str(error).split(".")[0], "updates_to_reach": None}
                print(f"{backend:8s} {init:17s} {curve['error']}", flush=True)
            else:
                final = (curve[key][-1] for key in ("max_mean_err", "min_sd_ratio", "max_sd_ratio"))
                print(
                    f"{backend:8s} {init:17s} reached at {curve['updates_to_reach']} updates; final max "
                    "|mean err| {:.3g} sd, sd ratio [{:.3g}, {:.3g}]".format(*final),
                    f"{curve['rejected'][-1]} rejected ({curve['seconds']:.0f} s)",
                    flush=True,
                )
            results[f"{backend} {init}"] = curve
    payload = {"updates": args.updates, "growth_cap": args.growth_cap, "options": options, "results": results}
    print("wrote", save(args.out, payload))


if __name__ == "__main__":
    main()
