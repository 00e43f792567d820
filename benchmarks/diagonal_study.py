"""Diagonal Gaussian guides with exact scores (issue 20): the closed-form step against the
optimizer path, with and without iterate averaging, and ADVI.

NumPyro, AutoDiagonalNormal, Adam 1e-2, float32, S = max(4, D/8), one seed. Targets:

- ``gauss D=.. well|ill``: the Gaussian study's ``N(m, Sigma)`` (condition number 10 or
  1e4, random rotation). The best diagonal Gaussian (reverse KL) has mean ``m`` and
  variances ``1 / diag(Sigma^-1)``; the metric is the excess ``KL(q || p) - KL(q* || p)``
  (exact), checked every 10 updates: score calls to the first excess < 0.01 and the
  final one.
- ``far separable``: ``N(3e3 (1, -1, 1), diag(1e-2, 1, 50)^2)`` from loc 0, scale 0.1
  (3e5 sds away), and ``earnings``: the earnings regression in dollars
  (``earnings_regression``, far from unit scale, intercept and slope correlated -0.999)
  from ``init_to_uniform`` (NumPyro's default) and ``init_to_median`` (Pyro's). Metric:
  max |mean error| in the diagonal optimum's sds and its sd ratios (the earnings
  optimum: :func:`~psvi.contrib.targets.earnings_diagonal_optimum`); updates to the band (errors
  <= 0.25 sd, ratios in [0.6, 1.5], as ``benchmarks.posteriordb``).
- ``crossed effects``: ``y_ij ~ N(mu + a_i + b_j, 1)`` on 40 x 30 cells, a nearly
  confounded direction (:func:`crossed_effects_case`); the same metric against the
  diagonal optimum.

Time per update: the mean over the run's jitted chunks after the first (compilation).

``--existing`` also reruns the ``psvi_diag`` rows of the other exact-score benchmarks with
each solver (``benchmarks.posteriordb``'s five posteriors at 16,000 calls, S = 8, and
``benchmarks.lowrank_study``'s D = 100 / 1,000 / 10,000 targets): what a change of the
default would move.

``--seeds N`` runs only the two solvers over N engine seeds (:func:`seed_study`).

    python -m benchmarks.diagonal_study [--updates 2000] [--existing] [--out diagonal_study]
    python -m benchmarks.diagonal_study --seeds 5 --out diagonal_study_seeds
    python -m benchmarks.diagonal_study --seeds 5 --antithetic --out diagonal_study_antithetic

``--antithetic``: ``--seeds`` and ``--existing`` compare the defaults with
``antithetic_particles=True`` instead of the two solvers.
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import SVI, Trace_ELBO, initialization
from numpyro.infer.autoguide import AutoDiagonalNormal

from benchmarks.common import band_errors, first_in_band, in_band, save
from numpyro_psvi import ProximalScoreVI
from numpyro_psvi.contrib.models import crossed_effects_model, earnings_regression, gaussian_target
from psvi.contrib.targets import (
    crossed_effects,
    earnings_data,
    earnings_diagonal_optimum,
    ill_conditioned_gaussian,
)

METHODS = {
    "optimizer": {"inner_solver": "optimizer"},
    "closed_form": {"inner_solver": "closed_form"},
    "optimizer+avg": {"inner_solver": "optimizer", "average_iterates": True},
    "closed_form+avg": {"inner_solver": "closed_form", "average_iterates": True},
    "advi": None,
}
CHUNK = 10
# Engine options compared by --seeds and --existing (--antithetic: the second pair).
SOLVERS = {"optimizer": {"inner_solver": "optimizer"}, "closed_form": {"inner_solver": "closed_form"}}
ANTITHETIC = {"defaults": {}, "antithetic": {"antithetic_particles": True}}


def _engine(method: str, model, guide, num_particles: int, **options):
    if METHODS[method] is None:
        return SVI(model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO(num_particles))
    options = {**METHODS[method], **options}
    return ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2), num_particles=num_particles, **options)


def _fit(
    method: str,
    model,
    guide,
    num_particles: int,
    updates: int,
    data: tuple,
    measure,
    seed: int = 0,
    **options,
) -> dict:
    """Run ``updates`` updates in jitted chunks of ``CHUNK``; ``measure(loc, scale)`` after
    each; ``options``: more engine options than ``method``'s."""
    engine = _engine(method, model, guide, num_particles, **options)
    state = engine.init(jax.random.PRNGKey(seed), *data)
    chunk = jax.jit(lambda s: jax.lax.scan(lambda s, _: engine.update(s, *data), s, None, length=CHUNK)[0])
    values, seconds = [], []
    for _ in range(updates // CHUNK):
        started = time.perf_counter()
        state = jax.block_until_ready(chunk(state))
        seconds.append(time.perf_counter() - started)
        params = engine.get_params(state)
        values.append(measure(*(np.asarray(params[f"auto_{p}"], np.float64) for p in ("loc", "scale"))))
    jax.clear_caches()  # one process compiles hundreds of fits (the seed study)
    return {
        "values": values,
        "ms_per_update": 1e3 * float(np.mean(seconds[1:])) / CHUNK,
        "rejected": int(getattr(state, "num_rejected", 0)),
    }


def gaussian_case(dim: int, condition: float, method: str, updates: int, seed: int = 0, **options) -> dict:
    mean, cov = ill_conditioned_gaussian(dim, condition, seed=0)
    precision = np.linalg.inv(cov)
    logdet_precision = np.linalg.slogdet(precision)[1]

    def reverse_kl(loc, scale):
        delta = loc - mean
        trace = np.sum(np.diag(precision) * scale**2)
        return 0.5 * (trace + delta @ precision @ delta - dim - np.sum(np.log(scale**2)) - logdet_precision)

    best = reverse_kl(mean, 1 / np.sqrt(np.diag(precision)))
    model = gaussian_target(mean, cov)
    num_particles = max(4, dim // 8)
    fit = _fit(
        method, model, AutoDiagonalNormal(model), num_particles, updates, (),
        lambda loc, scale: reverse_kl(loc, scale) - best, seed, **options,
    )  # fmt: skip
    below = [i for i, excess in enumerate(fit["values"]) if excess < 0.01]
    fit["calls_to_excess_0.01"] = (below[0] + 1) * CHUNK * num_particles if below else None
    fit["final_excess"] = fit["values"][-1]
    return fit


def _reached(fit: dict) -> dict:
    points = [(i + 1) * CHUNK for i in range(len(fit["values"]))]
    fit["updates_to_band"] = first_in_band(points, *zip(*fit["values"], strict=True))
    fit["final"] = fit["values"][-1]
    return fit


def far_separable_case(method: str, updates: int) -> dict:
    mean, sd = np.array([3e3, -3e3, 3e3]), np.array([1e-2, 1.0, 50.0])
    model = gaussian_target(mean, np.diag(sd**2))
    init = initialization.init_to_value(values={"x": jnp.zeros(3)})
    guide = AutoDiagonalNormal(model, init_loc_fn=init)
    return _reached(_fit(method, model, guide, 4, updates, (), partial(band_errors, reference=(mean, sd))))


def earnings_case(method: str, updates: int, init: str) -> dict:
    height, earn = earnings_data()
    reference = earnings_diagonal_optimum(height, earn)
    guide = AutoDiagonalNormal(earnings_regression, init_loc_fn=getattr(initialization, init))
    data = tuple(jnp.asarray(v) for v in (height, earn))
    return _reached(
        _fit(method, earnings_regression, guide, 8, updates, data, partial(band_errors, reference=reference))
    )


def crossed_effects_case(method: str, updates: int, seed: int = 0, **options) -> dict:
    """Crossed effects on 40 x 30 cells (:func:`~psvi.contrib.targets.crossed_effects`):
    the diagonal optimum is the posterior mean with sds ``1 / sqrt(diag P)``, but ``mu``
    and the effects' means are nearly confounded, so the location fit moves slowly along
    that direction and any common shift of the particles stays."""
    y, mean, sd = crossed_effects(40, 30)
    model = crossed_effects_model(40, 30)
    fit = _fit(
        method, model, AutoDiagonalNormal(model), 4, updates, (jnp.asarray(y),),
        partial(band_errors, reference=(mean, sd)), seed, **options,
    )  # fmt: skip
    return _reached(fit)


def existing_benchmarks(variants: dict[str, dict]) -> dict:
    """The ``psvi_diag`` rows of ``benchmarks.posteriordb`` and ``benchmarks.lowrank_study``
    with each variant's engine options."""
    from benchmarks import lowrank_study, posteriordb
    from numpyro_psvi.contrib.posteriordb import MODELS

    rows = {}
    for solver, options in variants.items():
        for name in MODELS:
            curve = posteriordb.run(name, "psvi_diag", 16_000, 20, 8, **options)
            rows[f"posteriordb {name} {solver}"] = curve
            print(
                f"posteriordb {name:40s} {solver:11s} reached at {curve['calls_to_reach']}; final err "
                f"{curve['max_mean_err'][-1]:.3g} sd, sd ratio [{curve['min_sd_ratio'][-1]:.3g}, "
                f"{curve['max_sd_ratio'][-1]:.3g}]",
                flush=True,
            )
        for dim in (100, 1000, 10_000):
            updates = 2000 if dim < 10_000 else 400
            curve = lowrank_study.fit("psvi_diag", dim, 10, 8, updates, **options)
            rows[f"lowrank D={dim} {solver}"] = curve
            kl = curve["kl"]
            print(
                f"lowrank D={dim:6d} {solver:11s} forward KL at 10% / 50% / 100%: "
                f"{kl[0]:.4g} / {kl[4]:.4g} / {kl[-1]:.4g} ({curve['seconds'][-1]:.1f} s)",
                flush=True,
            )
    return rows


def _posteriordb_curve(name: str, seed: int, **options) -> dict:
    """``benchmarks.posteriordb.run`` of the diagonal guide, then XLA's caches dropped: a
    process compiling hundreds of fits ran out of memory for LLVM's code (10 seeds x 2
    variants)."""
    from benchmarks import posteriordb

    curve = posteriordb.run(name, "psvi_diag", 16_000, 20, 8, seed=seed, **options)
    jax.clear_caches()
    return curve


def _late_share_in_band(curve: dict) -> float:
    """The share of a PosteriorDB curve's second-half checks in the reference band."""
    half = len(curve["max_mean_err"]) // 2
    late = (curve[key][half:] for key in ("max_mean_err", "min_sd_ratio", "max_sd_ratio"))
    return float(np.mean(in_band(*late)))


def seed_study(seeds: int, updates: int, variants: dict[str, dict]) -> dict:
    """Each variant's engine options (no averaging) over ``seeds`` engine seeds: the
    Gaussian targets' final excess, the crossed effects' final max error, and
    PosteriorDB's final max error and calls to the band (three posteriors: the ones where
    a diagonal guide reaches it, and arK)."""

    rows = {}
    for solver, options in variants.items():
        for dim, label, condition in (
            (10, "well", 10.0),
            (10, "ill", 1e4),
            (50, "well", 10.0),
            (50, "ill", 1e4),
        ):
            finals = [
                gaussian_case(dim, condition, "optimizer", updates, seed, **options)["final_excess"]
                for seed in range(seeds)
            ]
            rows[f"gauss D={dim} {label} {solver}"] = finals
            print(
                f"seeds gauss D={dim} {label} {solver:11s} final excess", " ".join(f"{v:.3g}" for v in finals)
            )
        crossed = [crossed_effects_case("optimizer", updates, seed, **options) for seed in range(seeds)]
        late = [
            float(np.mean(in_band(*zip(*c["values"][len(c["values"]) // 2 :], strict=True)))) for c in crossed
        ]
        rows[f"crossed effects {solver}"] = [
            {"final": c["final"], "updates_to_band": c["updates_to_band"], "late_share_in_band": share}
            for c, share in zip(crossed, late, strict=True)
        ]
        print(
            f"seeds crossed effects {solver:11s} final err",
            " ".join(f"{c['final'][0]:.3g}" for c in crossed),
            "updates to band",
            [c["updates_to_band"] for c in crossed],
            "late share in band",
            " ".join(f"{share:.2f}" for share in late),
            flush=True,
        )
        for name in (
            "eight_schools-eight_schools_noncentered",
            "arK-arK",
            "low_dim_gauss_mix-low_dim_gauss_mix",
        ):
            curves = [_posteriordb_curve(name, seed, **options) for seed in range(seeds)]
            rows[f"posteriordb {name} {solver}"] = [
                {
                    "final_max_mean_err": c["max_mean_err"][-1],
                    "calls_to_reach": c["calls_to_reach"],
                    "late_share_in_band": _late_share_in_band(c),
                }
                for c in curves
            ]
            print(
                f"seeds {name} {solver:11s} final err",
                " ".join(f"{c['max_mean_err'][-1]:.3g}" for c in curves),
                "reached at",
                [c["calls_to_reach"] for c in curves],
                "late share in band",
                " ".join(f"{_late_share_in_band(c):.2f}" for c in curves),
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--existing", action="store_true")
    parser.add_argument("--seeds", type=int, default=0, help="only the seed study, over this many seeds")
    parser.add_argument("--out", default="diagonal_study")
    parser.add_argument(
        "--antithetic", action="store_true",
        help="--seeds and --existing compare the defaults with antithetic_particles=True, not the solvers",
    )  # fmt: skip
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    variants = ANTITHETIC if args.antithetic else SOLVERS
    if args.seeds:
        rows = seed_study(args.seeds, args.updates, variants)
        print("wrote", save(args.out, {"updates": args.updates, "seeds": args.seeds, "results": rows}))
        return
    results = {}
    for dim in (10, 50):
        for label, condition in (("well", 10.0), ("ill", 1e4)):
            for method in METHODS:
                fit = gaussian_case(dim, condition, method, args.updates)
                results[f"gauss D={dim} {label} {method}"] = fit
                print(
                    f"gauss D={dim:3d} {label:4s} {method:16s} calls to excess<0.01: "
                    f"{fit['calls_to_excess_0.01']}, final {fit['final_excess']:.3g}, "
                    f"{fit['ms_per_update']:.3f} ms/update",
                    flush=True,
                )
    cases = {
        "far separable": far_separable_case,
        "earnings init_to_uniform": partial(earnings_case, init="init_to_uniform"),
        "earnings init_to_median": partial(earnings_case, init="init_to_median"),
        "crossed effects": crossed_effects_case,
    }
    for name, case in cases.items():
        for method in METHODS:
            fit = case(method, args.updates)
            results[f"{name} {method}"] = fit
            err, low, high = fit["final"]
            print(
                f"{name:24s} {method:16s} updates to band: {fit['updates_to_band']}, final err {err:.3g} sd, "
                f"sd ratio [{low:.3g}, {high:.3g}], {fit['rejected']} rejected",
                flush=True,
            )
    if args.existing:
        results["existing"] = existing_benchmarks(variants)
    print("wrote", save(args.out, {"updates": args.updates, "results": results}))


if __name__ == "__main__":
    main()
