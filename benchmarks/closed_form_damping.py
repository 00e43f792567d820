"""The closed-form step's damping (issue 20, item 2): the proximal weight, the KL budget
and the averaged iterates of AutoMultivariateNormal's closed-form step, measured where they
trade off.

The step's location moves ``2 / (2 + prox_weight)`` of the way to the one its particles
fit (in ``q_t``'s whitened coordinates), so ``prox_weight`` damps every update. The
settings: the defaults (prox_weight 3 with averaged iterates, the average restarted
while the fit progresses, and then 2.5 times the 0.02 nats per dimension budget and,
with at least ``D / 4`` particles, the weight 0.5: ``psvi.schedules``); prox_weight 3
with ``average_iterates=True`` (the weight 3 throughout, as a weight the user passes
holds); the earlier defaults (10, 0.02, the last iterate); and the last iterate at (3,
0.05) and (1, 0.05). On

- ``gaussian``: the Gaussian study's targets at D = 10, 50, 100 (benchmarks.gaussian_study,
  its budgets and S), score calls to the first KL < 0.01 with the KL checked after every
  update, GSM and BaM alongside;
- ``posteriordb``: the shared eight schools (non-centered and centered; S = 8, 16,000
  calls, 20 checks) over seeds: calls to the band and, over the last 10 checks, the share
  in the band and the median max |mean error| and max sd ratio (where a fit that has
  arrived wanders);
- ``heldout``: benchmarks.heldout_posteriors' cases (one seed): calls to the band.

NumPyro, float32, CPU. Each part writes ``closed_form_damping_<part>.json``.

    python -m benchmarks.closed_form_damping [--parts gaussian posteriordb heldout] [--seeds 5]
        [--configs defaults "(3, averaged)" ...] [--dims 10 50 100] [--gaussian-seeds 0 1 2]
        [--out-suffix _name]
"""

from __future__ import annotations

import argparse
import warnings

import jax
import numpy as np

from benchmarks import gaussian_study, heldout_posteriors, posteriordb
from benchmarks.common import in_band, save
from psvi.contrib.targets import ill_conditioned_gaussian

CONFIGS = {
    "defaults": {},  # 3 averaged; 0.5 while the fit progresses where S >= D / 4 (D = 10 here)
    "(3, averaged)": {"prox_weight": 3.0, "average_iterates": True},  # 3 throughout
    "(10, 0.02) last iterate": {"prox_weight": 10.0, "average_iterates": False},
    "(3, 0.05) last iterate": {"prox_weight": 3.0, "trust_region": 0.05, "average_iterates": False},
    "(1, 0.05) last iterate": {"prox_weight": 1.0, "trust_region": 0.05, "average_iterates": False},
}
BUDGETS = {10: 2000, 50: 8000, 100: 8000}
EIGHT_SCHOOLS = ("eight_schools-eight_schools_noncentered", "eight_schools-eight_schools_centered")


def gaussian_part(dims: tuple[int, ...] = tuple(BUDGETS), seeds: tuple[int, ...] = (0,)) -> dict:
    """Calls to KL < 0.01 (checked every update) and the final KL, per target and method
    (with several ``seeds``, per seed: a list)."""
    results = {}
    for dim in dims:
        budget, num_particles = BUDGETS[dim], max(4, dim // 8)
        checks = budget // num_particles
        for cond_name, condition in gaussian_study.CONDITIONS.items():
            mean, cov = ill_conditioned_gaussian(dim, condition, seed=0)
            for start_name, scale in gaussian_study.STARTS.items():
                key = f"D={dim} {cond_name} {start_name} S={num_particles}"
                runs = {f"psvi_full {name}": ("psvi_full", options) for name, options in CONFIGS.items()}
                runs.update({"gsm": ("gsm", {}), "bam": ("bam", {})})
                results[key] = {}
                for label, (method, options) in runs.items():
                    fits = []
                    for seed in seeds:
                        curve = gaussian_study.fit_curve(
                            method, mean, cov, scale, num_particles, budget, checks, seed=seed, **options
                        )
                        jax.clear_caches()
                        calls = gaussian_study.calls_to(curve, 0.01)
                        fits.append({"calls_to_0.01": calls, "final_kl": curve["kl"][-1]})
                    results[key][label] = fits[0] if len(seeds) == 1 else fits
                calls = {k: [f["calls_to_0.01"] for f in v] if len(seeds) > 1 else v["calls_to_0.01"]
                         for k, v in results[key].items()}  # fmt: skip
                print(key, calls, flush=True)
    return results


def arrived(curve: dict, last: int = 10) -> dict:
    """Where a fit is over its last ``last`` checks: the share in the band, the median
    max |mean error| and the median max sd ratio."""
    err, low, high = (np.asarray(curve[k][-last:]) for k in ("max_mean_err", "min_sd_ratio", "max_sd_ratio"))
    return {
        "calls_to_reach": curve["calls_to_reach"],
        "share_in_band": float(in_band(err, low, high).mean()),
        "median_err": float(np.median(err)),
        "median_max_sd_ratio": float(np.median(high)),
    }


def posteriordb_part(seeds: int) -> dict:
    """:func:`arrived` for each eight schools, setting and seed."""
    results = {}
    for name in EIGHT_SCHOOLS:
        results[name] = {}
        for label, options in CONFIGS.items():
            runs = []
            for seed in range(seeds):
                runs.append(arrived(posteriordb.run(name, "psvi_full", 16000, 20, 8, seed=seed, **options)))
                jax.clear_caches()  # each run compiles its own update: free them
            results[name][label] = runs
            print(name, label, [(r["calls_to_reach"], r["share_in_band"]) for r in runs], flush=True)
    return results


def heldout_part() -> dict:
    """:func:`arrived` for each held-out posterior and setting (NUTS references, seed 1)."""
    results = {}
    for name, (model, data) in heldout_posteriors.cases().items():
        reference = heldout_posteriors.reference_draws(model, data)
        results[name] = {}
        for label, options in CONFIGS.items():
            curve = heldout_posteriors.run(model, data, reference, "psvi", 10000, 25, 8, **options)
            results[name][label] = arrived(curve)
            jax.clear_caches()
        print(name, {k: v["calls_to_reach"] for k, v in results[name].items()}, flush=True)
    return results


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("gaussian", "posteriordb", "heldout"),
                        default=["gaussian", "posteriordb", "heldout"])  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--dims", nargs="+", type=int, choices=list(BUDGETS), default=list(BUDGETS))
    parser.add_argument("--gaussian-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out-suffix", default="", help="appended to each part's JSON name")
    args = parser.parse_args()
    for name in set(CONFIGS) - set(args.configs):
        del CONFIGS[name]
    parts = {
        "gaussian": lambda: gaussian_part(tuple(args.dims), tuple(args.gaussian_seeds)),
        "posteriordb": lambda: posteriordb_part(args.seeds),
        "heldout": heldout_part,
    }
    for part in args.parts:
        result = parts[part]()
        payload = {"configs": {k: v or "defaults" for k, v in CONFIGS.items()}, "results": result}
        print("wrote", save(f"closed_form_damping_{part}{args.out_suffix}", payload))


if __name__ == "__main__":
    main()
