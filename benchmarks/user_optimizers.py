"""The user's optimizer settings: ProximalScoreVI against SVI with the same optimizer.

A drop-in must work with whatever optimizer a script passes to ``SVI``, not only Adam.
On the conjugate regression of ``benchmarks/minibatch.py`` (N = 2,000, 5 weights, an
exact posterior), with exact scores (full batch) and mini-batch scores (B = 100), each
optimizer below fits AutoNormal with ``ProximalScoreVI`` (defaults) and with ``SVI``
(``Trace_ELBO(4)``, the engine's particle count), in both backends. Reported: the fitted
guide's largest mean error in posterior sds, its sd ratios to the exact ones, the
rejected updates, or the error a fit stopped with.

    python -m benchmarks.user_optimizers [--backends numpyro pyro] [--updates 2000] [--out NAME] [--quick]

docs/defaults.md ("The user's optimizer") reads ``user_optimizers_{numpyro,pyro}.json``
(``--backends numpyro --out user_optimizers_numpyro``, likewise for Pyro) and the same
runs on the commit before the inner objective's scale (``..._before.json``).
"""

from __future__ import annotations

import argparse
import itertools
import time
from functools import partial

import numpy as np

from benchmarks.common import band_errors, save
from benchmarks.minibatch import B, regression_data

# name: (NumPyro's optimizer, Pyro's) as (constructor name, arguments), the same settings.
OPTIMIZERS = {
    "Adam(1e-2)": (("Adam", (1e-2,), {}), ("Adam", {"lr": 1e-2})),
    "Adam(1e-3)": (("Adam", (1e-3,), {}), ("Adam", {"lr": 1e-3})),
    "ClippedAdam(1e-2)": (("ClippedAdam", (1e-2,), {}), ("ClippedAdam", {"lr": 1e-2})),
    "SGD(1e-4)": (("SGD", (1e-4,), {}), ("SGD", {"lr": 1e-4})),
    "SGD(5e-4)": (("SGD", (5e-4,), {}), ("SGD", {"lr": 5e-4})),
    "SGD(1e-4, momentum 0.9)": (("Momentum", (1e-4, 0.9), {}), ("SGD", {"lr": 1e-4, "momentum": 0.9})),
    "Adagrad(0.1)": (("Adagrad", (0.1,), {}), ("Adagrad", {"lr": 0.1})),
    "RMSProp(1e-3)": (("RMSProp", (1e-3,), {}), ("RMSprop", {"lr": 1e-3})),
}
REGIMES = {"exact": None, "mini-batch": B}


def numpyro_fit(engine: str, optimizer: str, subsample_size: int | None, updates: int, seed: int) -> dict:
    import jax
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    from numpyro_psvi import ProximalScoreVI
    from numpyro_psvi.contrib.models import linear_regression

    x, y, mean, sd = regression_data(seed)
    name, args, kwargs = OPTIMIZERS[optimizer][0]
    optim = getattr(numpyro.optim, name)(*args, **kwargs)
    model = partial(linear_regression, subsample_size=subsample_size)
    guide = AutoNormal(model)
    if engine == "psvi":
        fit = ProximalScoreVI(model, guide, optim, max_consecutive_rejections=None)
    else:
        fit = SVI(model, guide, optim, Trace_ELBO(4))
    result = fit.run(jax.random.PRNGKey(seed), updates, x, y, progress_bar=False)
    loc, scale = (np.asarray(result.params[f"w_auto_{part}"], np.float64) for part in ("loc", "scale"))
    rejected = int(result.state.num_rejected) if engine == "psvi" else None
    return {"errors": band_errors(loc, scale, (mean, sd)), "rejected": rejected}


def pyro_fit(engine: str, optimizer: str, subsample_size: int | None, updates: int, seed: int) -> dict:
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import linear_regression

    x, y, mean, sd = (np.asarray(value) for value in regression_data(seed))
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    name, options = OPTIMIZERS[optimizer][1]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = partial(linear_regression, subsample_size=subsample_size)
    guide = AutoNormal(model)
    optim = getattr(pyro.optim, name)(options)
    if engine == "psvi":
        fit = ProximalScoreVI(model, guide, optim, max_consecutive_rejections=None)
    else:
        fit = SVI(model, guide, optim, Trace_ELBO(4, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(updates):
        fit.step(x, y)
    loc = guide.locs.w.detach().double().numpy()
    scale = guide.scales.w.detach().double().numpy()
    rejected = int(fit.num_rejected) if engine == "psvi" else None
    return {"errors": band_errors(loc, scale, (mean, sd)), "rejected": rejected}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["numpyro", "pyro"], choices=["numpyro", "pyro"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="user_optimizers")
    parser.add_argument("--quick", action="store_true", help="Adam and SGD, 50 updates (the slow test)")
    options = parser.parse_args()
    if options.quick:
        options.optimizers, options.updates = ["Adam(1e-2)", "SGD(5e-4)"], 50
        options.out = "user_optimizers_quick"
    fits = {"numpyro": numpyro_fit, "pyro": pyro_fit}
    rows = []
    for backend, regime, optimizer, engine, seed in itertools.product(
        options.backends, REGIMES, options.optimizers, ("psvi", "svi"), options.seeds
    ):
        start = time.perf_counter()
        row = {"backend": backend, "regime": regime, "optimizer": optimizer, "engine": engine, "seed": seed}
        try:
            out = fits[backend](engine, optimizer, REGIMES[regime], options.updates, seed)
            error, low, high = out["errors"]
            row.update({
                "max mean error (sd)": error, "sd ratio min": low, "sd ratio max": high,
                "rejected": out["rejected"],
            })  # fmt: skip
        except Exception as exc:  # noqa: BLE001 -- a failed fit is a result of this benchmark
            row["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(row, flush=True)
    save(options.out, {"updates": options.updates, "rows": rows})


if __name__ == "__main__":
    main()
