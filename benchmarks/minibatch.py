"""Mini-batch regime (issue 19): the mechanism of the sd bias, and the fits it explains.

1. ``mechanism``: at a fixed guide ``q_t`` (the exact mean-field optimum of a subsampled
   linear regression, N=2000, B=100, 5 weights), over many mini-batches, the exact
   argmin of one update's proximal problem (BFGS) for the coupled objective of
   docs/algorithm.md and for the split objective, and what the inner problem estimates
   from one update: the location shift ``v_bar + g_bar / p_t`` and the curvature
   ``cross / spread``, signal against noise. Full batches as the control.
2. ``noise``: the same per-update estimates on the digits MLP (3,760 weights), at the
   guide a default fit reaches.
3. ``regression``: the fit with the defaults, Adam(1e-2) and Adam(1e-3), three seeds,
   3,000 and 6,000 updates.
4. ``digits``: the digits MLP of benchmarks/sweep_defaults.py (20,000 score calls, S=4)
   with the engine's defaults against ADVI, Adam(1e-2) and Adam(1e-3).
5. ``--mnist SIZE ...``: the MLP rows of benchmarks/mnist.py (N(0, 1) priors, 3000
   steps, Adam(1e-3), same protocol) for ProximalScoreVI's defaults and ADVI, written
   to benchmarks/results/mnist_minibatch.json (docs/mnist.md keeps the earlier rows).

    python -m benchmarks.minibatch [--quick] [--mnist 20000 60000] [--moves] [--lowrank] [--locals]
        [--run-length]

6. ``--moves``: the per-update move (K x lr) cut by 5, through the rate or through K, on
   the regression (3,000 updates, three seeds) and the digits MLP (20,000 score calls)
   against the defaults and ADVI; benchmarks/results/minibatch_moves.json.
7. ``--lowrank``: AutoLowRankMultivariateNormal (rank 2) on the regression, the settings
   before and after docs/minibatch.md section 15; benchmarks/results/minibatch_lowrank.json.
8. ``--locals``: models with local latents in subsampled plates (crossed effects with
   both plates subsampled: the mechanism and the fits; random-intercept and
   random-intercept-and-slope logistic regressions against their exact-score fits; a
   robust BNN on UCI Boston), the defaults (the orthogonal particle design) against the
   defaults with the coarse correction (``coarse_correction=True``) and independent
   particles, with the default memory and with ``curvature_memory=100`` (and SVI)
   (docs/minibatch.md sections 16-19); benchmarks/results/minibatch_locals.json.
9. ``--run-length``: crossed effects (against the exact posterior) and both logistic GLMMs
   (against exact-score fits with antithetic pairs and averaged iterates) at the user's
   Adam(1e-2) and Adam(1e-3), the defaults and SVI after 3,000 to 48,000 updates of one run
   (docs/minibatch.md section 20); benchmarks/results/minibatch_run_length.json.

Writes benchmarks/results/minibatch.json; docs/minibatch.md reads it.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from jax.scipy.optimize import minimize
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_value

from benchmarks.common import digits_fit, make_engine, save
from benchmarks.uci import BATCH, LEARNING_RATE, NUM_PARTICLES, glorot_init
from numpyro_psvi import ProximalScoreMatching, ProximalScoreVI
from numpyro_psvi.contrib.models import (
    bnn_regression,
    crossed_effects_plates_model,
    linear_regression,
    mlp_classifier,
    mlp_init_values,
    random_intercept_logistic_model,
    random_slope_logistic_model,
)
from numpyro_psvi.objective import (
    curvature_statistics,
    fisher_statistics,
    proximal_objective,
)
from psvi.contrib.datasets import load_digits, load_uci, uci_info
from psvi.contrib.targets import (
    crossed_effects,
    crossed_effects_marginal_sds,
    random_intercept_logistic_data,
    random_slope_logistic_data,
)

N, B, D = 2000, 100, 5


def regression_data(seed: int) -> tuple[jnp.ndarray, jnp.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) + rng.normal(size=N)).astype(np.float32)
    precision = np.eye(D) + x.T.astype(np.float64) @ x
    return (
        jnp.asarray(x),
        jnp.asarray(y),
        np.linalg.solve(precision, x.T @ y),
        1 / np.sqrt(np.diag(precision)),
    )


def draws(engine, params, args, num_draws, seed):
    """``num_draws`` updates' particles, scores and statistics at fixed ``params``."""
    density = engine.density

    def one(key):
        key_particles, key_batch = jax.random.split(key)
        particles, scored = engine.score_particles(density, params, {}, key_particles, key_batch, args, {})
        return particles, scored.scores

    return jax.vmap(one)(jax.random.split(jax.random.PRNGKey(seed), num_draws))


def per_update_estimates(engine, params, particles, scores):
    """Location shift (posterior sds of q_t) and curvature / precision of q_t, per update."""
    loc_t, scale_t = engine.density.loc_scale(params)

    def one(u, g):
        stats = fisher_statistics(engine.density, params, u, g)
        curvature = curvature_statistics(stats, scale_t)
        shift = (stats.offset + stats.score * scale_t**2) / stats.count / scale_t
        return shift, curvature.cross / curvature.spread * scale_t**2

    return jax.vmap(one)(particles, scores)


def argmin_sd_ratio(engine, params, particles, scores, split: bool, prox_weight: float = 10.0):
    """Fitted sd / sd_t and the location moved (sds of q_t), per update and coordinate,
    at the exact minimizer of one update's problem: BFGS on loc and log scale for the
    coupled objective; for the split one, whose gradient field holds ``p`` fixed in
    the location terms, its stationary point in closed form per coordinate (with
    ``x = p / p_t``: ``2a (x - c) + (lam/2)(1 - 1/x) = 0``, ``a = spread / S``,
    ``c = slope sigma_t^2``; then ``delta = shift * 2x / (2x + lam)``)."""
    density = engine.density
    loc_t, scale_t = density.loc_scale(params)
    flat_t, unravel = ravel_pytree(engine.optim.get_params(engine.reference_state))

    def one(u, g):
        stats = fisher_statistics(density, params, u, g)
        if split:
            curvature = curvature_statistics(stats, scale_t)
            a = curvature.spread / stats.count
            c = curvature.cross / curvature.spread * scale_t**2
            b = prox_weight / 2 - 2 * a * c
            x = (-b + jnp.sqrt(b**2 + 4 * a * prox_weight)) / (4 * a)
            shift = (stats.offset + stats.score * scale_t**2 / x) / stats.count / scale_t
            return x**-0.5, shift * 2 * x / (2 * x + prox_weight)

        def objective(flat):
            fitted = engine.constrain_fn(unravel(flat))
            options = {"prox_weight": prox_weight, "weighting": "covariance"}
            return proximal_objective(density, fitted, params, None, None, None, stats=stats, **options)[0]

        loc, scale = density.loc_scale(
            engine.constrain_fn(unravel(minimize(objective, flat_t, method="BFGS").x))
        )
        return scale / scale_t, (loc - loc_t) / scale_t

    return jax.vmap(one)(particles, scores)


def summarize(values: jnp.ndarray) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": values.mean(0).round(4).tolist(), "sd": values.std(0).round(4).tolist()}


def mechanism(num_draws: int) -> dict:
    x, y, mean, sd = regression_data(0)
    out = {}
    for label, batch in (("B=100", B), ("full batch", None)):
        model = partial(linear_regression, subsample_size=batch)
        guide = AutoNormal(model)
        engine = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
        engine.init(jax.random.PRNGKey(0), x, y)
        params = {"w_auto_loc": jnp.asarray(mean, jnp.float32), "w_auto_scale": jnp.asarray(sd, jnp.float32)}
        engine.reference_state = engine.optim.init(
            {"w_auto_loc": params["w_auto_loc"], "w_auto_scale": jnp.log(params["w_auto_scale"])}
        )
        particles, scores = draws(engine, params, (x, y), num_draws, seed=1)
        shift, precision = per_update_estimates(engine, params, particles, scores)
        entry = {
            "location shift (q_t sds)": summarize(shift),
            "curvature / precision_t": summarize(precision),
        }
        for name, split in (("coupled", False), ("split", True)):
            ratio, moved = argmin_sd_ratio(engine, params, particles, scores, split)
            entry[f"argmin {name}: sd / sd_t"] = summarize(ratio)
            entry[f"argmin {name}: location moved (q_t sds)"] = summarize(moved)
        out[label] = entry
    return out


def digits_noise(num_calls: int, num_draws: int) -> dict:
    x_train, y_train, _, _ = map(jnp.asarray, load_digits())
    model = partial(mlp_classifier, subsample_size=64)
    guide = AutoNormal(
        model, init_loc_fn=init_to_value(values=mlp_init_values(x_train.shape[1])), init_scale=0.01
    )
    engine = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
    result = engine.run(jax.random.PRNGKey(0), num_calls // 4, x_train, y_train, progress_bar=False)
    params = engine._iterate_params(result.state)
    particles, scores = draws(engine, params, (x_train, y_train), num_draws, seed=2)
    shift, precision = per_update_estimates(engine, params, particles, scores)
    shift, precision = np.asarray(shift, np.float64), np.asarray(precision, np.float64)
    finite = np.all(np.isfinite(shift), 0) & np.all(np.isfinite(precision), 0)
    shift, precision = shift[:, finite], precision[:, finite]
    # Per coordinate: the estimate's mean over updates (signal) against its sd (noise).
    snr_shift = np.abs(shift.mean(0)) / shift.std(0)
    snr_curvature = np.abs(precision.mean(0)) / precision.std(0)
    quantiles = [0.1, 0.5, 0.9]
    return {
        "weights": int(finite.size),
        "weights with finite estimates": int(finite.sum()),
        "location shift sd (q_t sds), quantiles 10/50/90%": np.nanquantile(shift.std(0), quantiles)
        .round(3)
        .tolist(),
        "location shift |mean|/sd, quantiles": np.nanquantile(snr_shift, quantiles).round(3).tolist(),
        "curvature / precision_t mean, quantiles": np.nanquantile(precision.mean(0), quantiles)
        .round(3)
        .tolist(),
        "curvature / precision_t sd, quantiles": np.nanquantile(precision.std(0), quantiles)
        .round(3)
        .tolist(),
        "curvature |mean|/sd, quantiles": np.nanquantile(snr_curvature, quantiles).round(3).tolist(),
        "sqrt(N/B)": float(np.sqrt(x_train.shape[0] / 64)),
    }


def regression_fits(step_counts: tuple[int, ...], seeds: int) -> list[dict]:
    rows = []
    model = partial(linear_regression, subsample_size=B)
    for num_steps, lr, seed in itertools.product(step_counts, (1e-2, 1e-3), range(seeds)):
        x, y, mean, sd = regression_data(seed)
        engine = ProximalScoreVI(model, AutoNormal(model), numpyro.optim.Adam(lr))
        result = engine.run(jax.random.PRNGKey(seed), num_steps, x, y, progress_bar=False)
        loc = np.asarray(result.params["w_auto_loc"], np.float64)
        scale = np.asarray(result.params["w_auto_scale"], np.float64)
        iterate = engine._iterate_params(result.state)
        rows.append({
            "lr": lr, "seed": seed, "updates": num_steps,
            "max mean error (sd)": float(np.max(np.abs(loc - mean) / sd)),
            "sd ratio min": float(np.min(scale / sd)), "sd ratio max": float(np.max(scale / sd)),
            "last iterate max mean error (sd)": float(
                np.max(np.abs(np.asarray(iterate["w_auto_loc"]) - mean) / sd)
            ),
            "rejected": int(result.state.num_rejected),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


LOWRANK_SETTINGS = {
    "before (K = 20, prox_weight 10, last iterate)": {
        "inner_steps": 20,
        "prox_weight": 10.0,
        "average_iterates": False,
    },
    "K = 20, the generic weight, averaged": {"inner_steps": 20},
    "defaults (K = 5, the generic weight, averaged)": {},
}


def lowrank_fits(num_steps: int, seeds: int) -> list[dict]:
    """AutoLowRankMultivariateNormal (rank 2) on the regression of :func:`regression_fits`
    under each of :data:`LOWRANK_SETTINGS`: the worst mean error in exact posterior sds and
    the marginal sds' ratios to the exact ones."""
    rows = []
    model = partial(linear_regression, subsample_size=B)
    for (label, options), lr, seed in itertools.product(LOWRANK_SETTINGS.items(), (1e-2, 1e-3), range(seeds)):
        x, y, mean, sd = regression_data(seed)
        guide = AutoLowRankMultivariateNormal(model, rank=2)
        engine = ProximalScoreVI(model, guide, numpyro.optim.Adam(lr), **options)
        result = engine.run(jax.random.PRNGKey(seed), num_steps, x, y, progress_bar=False)
        posterior = guide.get_posterior(result.params)
        loc = np.asarray(posterior.loc, np.float64)
        fitted_sd = np.sqrt(np.diag(np.asarray(posterior.covariance_matrix, np.float64)))
        rows.append({
            "settings": label, "lr": lr, "seed": seed, "updates": num_steps,
            "max mean error (sd)": float(np.max(np.abs(loc - mean) / sd)),
            "sd ratio min": float(np.min(fitted_sd / sd)), "sd ratio max": float(np.max(fitted_sd / sd)),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def digits_fits(num_calls: int) -> list[dict]:
    rows = []
    for method, lr in itertools.product(("psvi", "advi"), (1e-2, 1e-3)):
        make = partial(make_engine, method, lr=lr, num_particles=4)
        report = digits_fit(lambda model, guide, make=make: make(model, guide), num_calls, 4)
        rows.append({"method": method, "lr": lr, "score_calls": num_calls, **report})
        print(rows[-1], flush=True)
    return rows


def mnist_rows(sizes: list[int]) -> None:
    from benchmarks.mnist import run_one

    rows = []
    for size in sizes:
        for method in ("psvi", "advi"):
            out = run_one(method, "mlp", "standard", size, 3000, seed=0, progress=False)
            for bulky in ("curve", "reliability", "probs"):
                out.pop(bulky, None)
            rows.append({"method": method, "train_size": size, **out})
            print(rows[-1], flush=True)
    print(save("mnist_minibatch", {"model": "mlp", "prior": "standard", "steps": 3000, "results": rows}))


# The per-update move: K inner steps of Adam(lr) carry a weight at most ~K * lr.
MOVES = {"K = 5, Adam(lr) (defaults)": (5, 1.0), "K = 5, Adam(lr / 5)": (5, 0.2), "K = 1, Adam(lr)": (1, 1.0)}


def move_fits(num_calls: int, num_steps: int, seeds: int) -> list[dict]:
    """The regression (worst weight, seeds) and the digits MLP (``num_calls`` score calls)
    with the per-update move cut by 5 (the optimizer's rate, or K), against the defaults
    and ADVI, at the user's Adam(1e-2) and Adam(1e-3)."""
    rows = []
    model = partial(linear_regression, subsample_size=B)
    for lr, (label, (inner, factor)) in itertools.product((1e-2, 1e-3), MOVES.items()):
        errors, ratios = [], []
        for seed in range(seeds):
            x, y, mean, sd = regression_data(seed)
            engine = ProximalScoreVI(
                model, AutoNormal(model), numpyro.optim.Adam(lr * factor), inner_steps=inner
            )
            params = engine.run(jax.random.PRNGKey(seed), num_steps, x, y, progress_bar=False).params
            loc, scale = (np.asarray(params[f"w_auto_{k}"], np.float64) for k in ("loc", "scale"))
            errors.append(float(np.max(np.abs(loc - mean) / sd)))
            ratios.append([float(np.min(scale / sd)), float(np.max(scale / sd))])
        rows.append({"target": "regression", "lr": lr, "engine": label, "updates": num_steps,
                     "max mean error (sd)": errors, "sd ratio range": ratios})  # fmt: skip
        print(rows[-1], flush=True)
    for lr, (label, (inner, factor)) in itertools.product((1e-2, 1e-3), {**MOVES, "ADVI": (0, 0.0)}.items()):
        if label == "ADVI":
            make = partial(make_engine, "advi", lr=lr, num_particles=4)
        else:
            make = partial(make_engine, "psvi", lr=lr * factor, num_particles=4, inner_steps=inner)
        report = digits_fit(lambda model, guide, make=make: make(model, guide), num_calls, 4)
        rows.append({"target": "digits", "lr": lr, "engine": label, "score_calls": num_calls, **report})
        print(rows[-1], flush=True)
    return rows


CROSSED_ROWS, CROSSED_COLS, CROSSED_BATCH = 40, 30, 10


def crossed_mechanism(num_draws: int) -> dict:
    """At the best diagonal Gaussian of crossed effects (fixed), ``num_draws`` updates'
    curvature estimates of ``mu`` over its precision (the target ratio of the split
    objective), with both plates subsampled (independent particles and the orthogonal
    design) and with every member: their mean and sd, the share not positive, and the mean
    of the positive ones (what fitting only where the estimate is positive aims at)."""
    y, mean, sd = crossed_effects(CROSSED_ROWS, CROSSED_COLS)
    out = {}
    cases = (
        (f"B={CROSSED_BATCH} of each plate, independent particles", CROSSED_BATCH, False),
        (f"B={CROSSED_BATCH} of each plate, orthogonal design (the default)", CROSSED_BATCH, None),
        ("full batch", None, None),
    )
    for label, batch, orthogonal in cases:
        model = crossed_effects_plates_model(CROSSED_ROWS, CROSSED_COLS, batch)
        engine = ProximalScoreVI(
            model, AutoNormal(model), numpyro.optim.Adam(1e-2), orthogonal_particles=orthogonal
        )
        engine.init(jax.random.PRNGKey(0), jnp.asarray(y))
        layout = engine.density.unpack(jnp.arange(engine.density.latent_dim, dtype=jnp.float32))
        index = int(layout["mu"])
        sizes = {"mu": 1, "a": CROSSED_ROWS, "b": CROSSED_COLS}
        offsets = {"mu": 0, "a": 1, "b": 1 + CROSSED_ROWS}
        params = {
            f"{name}_auto_{part}": jnp.asarray(
                values[offsets[name] : offsets[name] + sizes[name]], jnp.float32
            ).reshape(jnp.shape(layout[name]))
            for name in sizes
            for part, values in (("loc", mean), ("scale", sd))
        }
        particles, scores = draws(engine, params, (jnp.asarray(y),), num_draws, seed=1)
        ratio = np.asarray(per_update_estimates(engine, params, particles, scores)[1][:, index], np.float64)
        out[label] = {
            "mu curvature / precision: mean": float(ratio.mean()),
            "sd": float(ratio.std()),
            "share not positive": float(np.mean(~(ratio > 0))),
            "mean of the positive": float(ratio[ratio > 0].mean()),
        }
        print(label, out[label], flush=True)
    return out


def memory_engines(model) -> dict:
    """By label, ``make(lr)`` of the engines the models with local latents compare: the
    defaults (the orthogonal particle design), the defaults with the coarse correction
    (``coarse_correction=True``), independent particles with the default memory and
    with ``curvature_memory=100``, and SVI (``Trace_ELBO(4)``), AutoNormal and Adam."""
    memory = {"loss": ProximalScoreMatching(curvature_memory=100), "orthogonal_particles": False}

    def engine(lr: float, **options) -> ProximalScoreVI:
        return ProximalScoreVI(model, AutoNormal(model), numpyro.optim.Adam(lr), **options)

    return {
        "defaults": engine,
        "coarse correction": partial(engine, coarse_correction=True),
        "independent particles": partial(engine, orthogonal_particles=False),
        "independent particles, curvature_memory=100": partial(engine, **memory),
        "SVI": lambda lr: SVI(model, AutoNormal(model), numpyro.optim.Adam(lr), Trace_ELBO(4)),
    }


def crossed_fits(num_steps: int, seeds: int) -> list[dict]:
    """Crossed effects with both plates subsampled (docs/minibatch.md section 16), the
    :func:`memory_engines` at Adam(1e-2) and Adam(1e-3): ``mu``'s and the locals' sds over
    the best diagonal Gaussian's, and the largest mean error in its sds."""
    y, mean, sd = crossed_effects(CROSSED_ROWS, CROSSED_COLS)
    model = crossed_effects_plates_model(CROSSED_ROWS, CROSSED_COLS, CROSSED_BATCH)
    rows = []
    for lr, (label, make) in itertools.product((1e-2, 1e-3), memory_engines(model).items()):
        for seed in range(seeds):
            fit = make(lr).run(jax.random.PRNGKey(seed), num_steps, jnp.asarray(y), progress_bar=False)
            params = fit.params
            loc, scale = (
                np.concatenate([np.ravel(params[f"{name}_auto_{part}"]) for name in ("mu", "a", "b")])
                for part in ("loc", "scale")
            )
            error, ratio = np.abs(loc - mean) / sd, scale / sd
            rows.append({"lr": lr, "engine": label, "seed": seed, "updates": num_steps,
                         "mu sd ratio": float(ratio[0]), "locals sd ratio range": [float(ratio[1:].min()),
                         float(ratio[1:].max())], "mu mean error (sd)": float(error[0]),
                         "max mean error (sd)": float(error.max())})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


GLMM_GROUPS, GLMM_BATCH = 100, 10


class GLMM(NamedTuple):
    """A logistic GLMM of the ``--locals`` study: its model factory ``make(groups,
    batch)``, data ``(x, y)``, AutoNormal sites (the globals first, ``num_globals`` of them)
    and the exact-score reference's engine options."""

    make: Callable
    data: tuple[np.ndarray, np.ndarray]
    sites: tuple[str, ...]
    num_globals: int
    reference_options: dict


STEADY_REFERENCE = {"num_particles": 8, "antithetic_particles": True, "average_iterates": True}
"""Exact-score reference options that hold a GLMM's fit in place: antithetic pairs and the
averaged iterate (moved <= 0.03 sds between 30,000 and 60,000 updates on both GLMMs)."""

GLMMS = {
    # Its reference, the defaults' exact-score fit, moved 0.18 sds along tau between 30,000
    # and 60,000 updates (minibatch_locals.json); --run-length holds it with STEADY_REFERENCE.
    "random-intercept logistic": GLMM(
        random_intercept_logistic_model, random_intercept_logistic_data(GLMM_GROUPS),
        ("mu", "beta", "tau", "z"), 3, {},
    ),
    # Its defaults' exact-score fit wanders 0.3-0.4 sds along the weakly pinned directions
    # (measured between 20,000 and 30,000 updates): antithetic pairs and the averaged
    # iterate hold it (docs/gaussian_study.md, "Antithetic particles").
    "random-slope logistic": GLMM(
        random_slope_logistic_model, random_slope_logistic_data(GLMM_GROUPS),
        ("mu", "beta", "tau_a", "tau_b", "z", "w"), 4,
        STEADY_REFERENCE,
    ),
}  # fmt: skip


def glmm_flat(params: dict, sites: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A GLMM's AutoNormal locs and scales over ``sites``, flat."""
    return tuple(
        np.concatenate([np.ravel(params[f"{name}_auto_{part}"]) for name in sites]).astype(np.float64)
        for part in ("loc", "scale")
    )


def glmm_errors(glmm: GLMM, params: dict, ref_loc: np.ndarray, ref_sd: np.ndarray) -> dict:
    """A GLMM fit's AutoNormal ``params`` against the reference: per global, mean error in
    the reference's sds and sd over the reference's, and the locals' largest error and
    sd ratios' range."""
    loc, scale = glmm_flat(params, glmm.sites)
    error, ratio, g = np.abs(loc - ref_loc) / ref_sd, scale / ref_sd, glmm.num_globals
    return {"globals mean error (sd)": np.round(error[:g], 3).tolist(),
            "globals sd ratio": np.round(ratio[:g], 3).tolist(),
            "locals max mean error (sd)": float(error[g:].max()),
            "locals sd ratio range": [float(ratio[g:].min()), float(ratio[g:].max())]}  # fmt: skip


def glmm_reference(
    glmm: GLMM, reference_steps: tuple[int, int], options: dict
) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """A GLMM's exact-score reference (every group, AutoNormal, Adam(1e-2), the engine
    ``options``): its flat locs and scales after ``reference_steps[1]`` updates, and a
    record of the run with its drift from ``reference_steps[0]`` updates in its sds (the
    reference's own error)."""
    x, y = (jnp.asarray(part) for part in glmm.data)
    exact = glmm.make(GLMM_GROUPS)
    (loc_a, _), (ref_loc, ref_sd) = (
        glmm_flat(
            ProximalScoreVI(exact, AutoNormal(exact), numpyro.optim.Adam(1e-2), **options)
            .run(jax.random.PRNGKey(0), steps, x, y, progress_bar=False)
            .params,
            glmm.sites,
        )
        for steps in reference_steps
    )
    drift, g = np.abs(loc_a - ref_loc) / ref_sd, glmm.num_globals
    record = {"globals": list(glmm.sites[:g]), "reference steps": list(reference_steps),
              "reference options": options, "reference drift (sds)": np.round(drift[:g], 3).tolist(),
              "reference locals drift (sds, max)": float(drift[g:].max())}  # fmt: skip
    print(record, flush=True)
    return (ref_loc, ref_sd), record


RUN_LENGTHS = (3000, 6000, 12000, 24000, 48000)


def params_along_run(
    engine: ProximalScoreVI | SVI, run_lengths: tuple[int, ...], seed: int, *args
) -> Iterator[tuple[int, dict]]:
    """``(updates, params)`` of one run of ``engine`` (``ProximalScoreVI`` or ``SVI``: the
    same ``init / update / get_params``) after each of ``run_lengths`` updates."""
    state, update = engine.init(jax.random.PRNGKey(seed), *args), jax.jit(engine.update)
    for done in range(1, run_lengths[-1] + 1):
        state, _ = update(state, *args)
        if done in run_lengths:
            yield done, engine.get_params(state)


def crossed_run_length_fits(run_lengths: tuple[int, ...], seeds: int) -> list[dict]:
    """Crossed effects (docs/minibatch.md section 16) at the user's Adam(1e-2) and
    Adam(1e-3): the defaults and SVI (``Trace_ELBO(4)``) after each of ``run_lengths``
    updates of one run; ``mu``'s and the largest mean error in the best diagonal
    Gaussian's sds and in the exact posterior's marginal sds (the mission's unit), the sds
    over the optimum's."""
    y, mean, sd = crossed_effects(CROSSED_ROWS, CROSSED_COLS)
    marginal = crossed_effects_marginal_sds(CROSSED_ROWS, CROSSED_COLS)
    engines = memory_engines(crossed_effects_plates_model(CROSSED_ROWS, CROSSED_COLS, CROSSED_BATCH))
    rows = []
    for lr, label, seed in itertools.product((1e-2, 1e-3), ("defaults", "SVI"), range(seeds)):
        for done, params in params_along_run(engines[label](lr), run_lengths, seed, jnp.asarray(y)):
            loc, scale = (
                np.concatenate([np.ravel(params[f"{name}_auto_{part}"]) for name in ("mu", "a", "b")])
                for part in ("loc", "scale")
            )
            error, ratio = np.abs(loc - mean), scale / sd
            rows.append({"lr": lr, "engine": label, "seed": seed, "updates": done,
                         "mu mean error (optimum sd)": float(error[0] / sd[0]),
                         "max mean error (optimum sd)": float((error / sd).max()),
                         "mu mean error (marginal sd)": float(error[0] / marginal[0]),
                         "max mean error (marginal sd)": float((error / marginal).max()),
                         "sd ratio range": [float(ratio.min()), float(ratio.max())]})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def run_length_fits(
    glmm: GLMM, run_lengths: tuple[int, ...], seeds: int, reference_steps: tuple[int, int]
) -> dict:
    """A logistic GLMM at the user's Adam(1e-2) and Adam(1e-3): the defaults and SVI
    (``Trace_ELBO(4)``, the same score calls per update) after each of ``run_lengths``
    updates of one run, against the exact-score reference with :data:`STEADY_REFERENCE`
    (both GLMMs; the defaults' own exact-score fit wanders 0.2 sds along the intercept
    model's ``tau``): :func:`glmm_errors`."""
    x, y = (jnp.asarray(part) for part in glmm.data)
    (ref_loc, ref_sd), out = glmm_reference(glmm, reference_steps, STEADY_REFERENCE)
    model = glmm.make(GLMM_GROUPS, GLMM_BATCH)
    engines = {key: value for key, value in memory_engines(model).items() if key in ("defaults", "SVI")}
    rows = []
    for lr, (label, make), seed in itertools.product((1e-2, 1e-3), engines.items(), range(seeds)):
        for done, params in params_along_run(make(lr), run_lengths, seed, x, y):
            labels = {"lr": lr, "engine": label, "seed": seed, "updates": done}
            rows.append({**labels, **glmm_errors(glmm, params, ref_loc, ref_sd)})
            print(rows[-1], flush=True)
    return {**out, "rows": rows}


def glmm_fits(glmm: GLMM, num_steps: int, seeds: int, reference_steps: tuple[int, int]) -> dict:
    """A logistic GLMM (100 groups of 20, groups subsampled 10 at a time), against the
    same guide's exact-score fit (every group, ``glmm.reference_options``,
    ``reference_steps[1]`` updates; its distance to the fit at ``reference_steps[0]`` is
    reported as the reference's own error): the :func:`memory_engines` at Adam(1e-2) and
    Adam(1e-3), per global site and over the locals, mean error in the reference's sds and
    sd over the reference's."""
    x, y = (jnp.asarray(part) for part in glmm.data)
    (ref_loc, ref_sd), out = glmm_reference(glmm, reference_steps, glmm.reference_options)
    model = glmm.make(GLMM_GROUPS, GLMM_BATCH)
    rows = []
    for lr, (label, make) in itertools.product((1e-2, 1e-3), memory_engines(model).items()):
        for seed in range(seeds):
            fit = make(lr).run(jax.random.PRNGKey(seed), num_steps, x, y, progress_bar=False)
            labels = {"lr": lr, "engine": label, "seed": seed, "updates": num_steps}
            rows.append({**labels, **glmm_errors(glmm, fit.params, ref_loc, ref_sd)})
            print(rows[-1], flush=True)
    return {**out, "rows": rows}


ROBUST_DF, ROBUST_DRAWS = 4.0, 100


def robust_bnn_fits(splits: int) -> list[dict]:
    """A network with local latents: the UCI BNN on Boston (the protocol of
    benchmarks/uci.py: batches of 32, 40 epochs, S = 4, Adam(1e-2)) with a Student-t
    likelihood as a scale mixture (``bnn_regression(student_df=4)``: one local ``lam`` per
    training point), the defaults (the orthogonal particle design) against the defaults
    with the coarse correction and independent particles with the default memory and
    with ``curvature_memory=100``; test
    log-likelihood of the Student-t predictive over 100 draws of the globals."""
    rows = []
    for split_id in range(splits):
        split = load_uci("bostonHousing", split_id)
        x, y, x_test = (jnp.asarray(part) for part in (split.x_train, split.y_train, split.x_test))
        init = {name: jnp.asarray(value) for name, value in glorot_init(x.shape[1], 50, split_id).items()}
        model = partial(bnn_regression, subsample_size=BATCH, student_df=ROBUST_DF)
        steps = uci_info("bostonHousing")["epochs"] * math.ceil(len(split.y_train) / BATCH)
        engines = (
            ("defaults", None, None, False),
            ("coarse correction", None, None, True),
            ("independent particles", False, None, False),
            ("independent particles, curvature_memory=100", False, 100, False),
        )
        for label, orthogonal, memory, coarse in engines:
            guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
            engine = ProximalScoreVI(
                model, guide, numpyro.optim.Adam(LEARNING_RATE), num_particles=NUM_PARTICLES,
                loss=ProximalScoreMatching(curvature_memory=memory), orthogonal_particles=orthogonal,
                coarse_correction=coarse,
            )  # fmt: skip
            params = engine.run(jax.random.PRNGKey(split_id), steps, x, y, progress_bar=False).params
            draws = {}
            for key, name in zip(jax.random.split(jax.random.PRNGKey(split_id + 1), 5), init, strict=True):
                loc, scale = params[f"{name}_auto_loc"], params[f"{name}_auto_scale"]
                draws[name] = loc + scale * jax.random.normal(key, (ROBUST_DRAWS, *jnp.shape(loc)))
            hidden = jax.nn.relu(jnp.einsum("ni,sih->snh", x_test, draws["w1"]) + draws["b1"][:, None])
            means = jnp.einsum("snh,sh->sn", hidden, draws["w2"]) + draws["b2"][:, None]
            scales = jnp.exp(draws["precision"])[:, None] ** -0.5
            log_density = dist.StudentT(ROBUST_DF, means, scales).log_prob(jnp.asarray(split.y_test))
            test_ll = jax.scipy.special.logsumexp(log_density, 0) - math.log(ROBUST_DRAWS)
            rows.append({"split": split_id, "engine": label,
                         "test_ll": float(jnp.mean(test_ll)) - math.log(split.y_std)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mnist", type=int, nargs="*", help="MNIST training sizes (MLP rows only)")
    parser.add_argument("--moves", action="store_true", help="only the per-update move study")
    parser.add_argument("--lowrank", action="store_true", help="only AutoLowRankMultivariateNormal's fits")
    parser.add_argument("--locals", action="store_true", help="only the models with local latents")
    parser.add_argument(
        "--run-length", action="store_true", help="only the local-latent models over run lengths"
    )
    args = parser.parse_args()
    if args.run_length:
        lengths, seeds = ((300, 600), 1) if args.quick else (RUN_LENGTHS, 3)
        reference_steps = (1000, 2000) if args.quick else (30000, 60000)
        payload = {
            "crossed effects": crossed_run_length_fits(lengths, seeds),
            **{name: run_length_fits(glmm, lengths, seeds, reference_steps) for name, glmm in GLMMS.items()},
        }
        print(save("minibatch_run_length_quick" if args.quick else "minibatch_run_length", payload))
        return
    if args.locals:
        steps, seeds = (300, 1) if args.quick else (3000, 3)
        reference_steps = (1000, 2000) if args.quick else (30000, 60000)
        payload = {
            "crossed effects mechanism": crossed_mechanism(200 if args.quick else 4000),
            "crossed effects": crossed_fits(steps, seeds),
            **{name: glmm_fits(glmm, steps, seeds, reference_steps) for name, glmm in GLMMS.items()},
            "robust BNN, Boston": robust_bnn_fits(1 if args.quick else 5),
        }
        print(save("minibatch_locals_quick" if args.quick else "minibatch_locals", payload))
        return
    if args.lowrank:
        rows = lowrank_fits(300 if args.quick else 3000, 1 if args.quick else 3)
        print(save("minibatch_lowrank_quick" if args.quick else "minibatch_lowrank", {"rows": rows}))
        return
    if args.moves:
        rows = move_fits(2000 if args.quick else 20000, 300 if args.quick else 3000, 1 if args.quick else 3)
        print(save("minibatch_moves_quick" if args.quick else "minibatch_moves", {"rows": rows}))
        return
    if args.mnist:
        mnist_rows(args.mnist)
        return
    num_draws = 50 if args.quick else 400
    payload = {
        "mechanism": mechanism(num_draws),
        "digits noise": digits_noise(2000 if args.quick else 20000, num_draws),
        "regression": regression_fits((300,) if args.quick else (3000, 6000), 1 if args.quick else 3),
        "digits": digits_fits(2000 if args.quick else 20000),
    }
    print(save("minibatch_quick" if args.quick else "minibatch", payload))


if __name__ == "__main__":
    main()
