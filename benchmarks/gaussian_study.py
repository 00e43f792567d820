"""Gaussian-target study (the paper's Figure 1): ProximalScoreVI vs ADVI, GSM and BaM.

Targets: N(m, Sigma) with eigenvalues log-spaced over a condition number (well: 10,
ill: 1e4), D in {10, 50, 100, 500}; guides start at N(0, I) ("standard") or
N(0, 1e-4 I) ("small"). Every method uses the same S particles per iteration:
ProximalScoreVI with a full-covariance and a diagonal guide (defaults, Adam 1e-2),
ADVI (SVI, Trace_ELBO, full covariance, Adam 1e-2), GSM, BaM (constant l = 1).
Recorded against score calls: forward KL(target || q), relative errors of the mean
and covariance; and wall time per iteration against D. A second part fits a Bayesian
linear regression under mini-batch scores with BaM and ProximalScoreVI, to show
BaM's bias and ProximalScoreVI's unbiasedness. NumPyro backend, CPU.

    python -m benchmarks.gaussian_study [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal
from numpyro.infer.initialization import init_to_value

from benchmarks.common import save
from numpyro_psvi import GSM, BaM, ProximalScoreVI
from numpyro_psvi.contrib.models import gaussian_target, linear_regression
from psvi.contrib.plots import plot_curves
from psvi.contrib.targets import conjugate_linear_regression, ill_conditioned_gaussian
from psvi.metrics import gaussian_kl

DOCS = Path(__file__).parent.parent / "docs"
METHODS = ("psvi_full", "psvi_diag", "advi", "gsm", "bam")
CONDITIONS = {"well": 10.0, "ill": 1e4}
STARTS = {"standard": 1.0, "small": 1e-2}


def make_engine(method: str, model, dim: int, start_scale: float, num_particles: int, **psvi_options):
    """The method's engine and guide; ``psvi_options`` go to ``ProximalScoreVI``."""
    init = init_to_value(values={"x": jnp.zeros(dim)})
    guide_cls = AutoDiagonalNormal if method == "psvi_diag" else AutoMultivariateNormal
    guide = guide_cls(model, init_loc_fn=init, init_scale=start_scale)
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


def moments(guide, params) -> tuple[np.ndarray, np.ndarray]:
    posterior = guide.get_posterior(params)
    if isinstance(guide, AutoDiagonalNormal):
        return np.asarray(posterior.mean, np.float64), np.diag(np.asarray(posterior.variance, np.float64))
    return np.asarray(posterior.loc, np.float64), np.asarray(posterior.covariance_matrix, np.float64)


def fit_curve(
    method, mean, cov, start_scale, num_particles, max_calls, num_checks, seed=0, **psvi_options
) -> dict:
    """KL and relative errors at ``num_checks`` points up to ``max_calls`` score calls."""
    dim = len(mean)
    model = gaussian_target(mean, cov)
    engine, guide = make_engine(method, model, dim, start_scale, num_particles, **psvi_options)
    state = engine.init(jax.random.PRNGKey(seed))
    updates_per_check = max(max_calls // num_particles // num_checks, 1)
    chunk = jax.jit(
        lambda s: jax.lax.scan(lambda s, _: engine.update(s), s, None, length=updates_per_check)[0]
    )
    curve = {"calls": [], "kl": [], "mean_rel_err": [], "cov_rel_err": []}
    chunk_seconds = []
    for check in range(1, num_checks + 1):
        start = time.perf_counter()
        state = jax.block_until_ready(chunk(state))
        if check > 1:  # the first chunk includes compilation
            chunk_seconds.append(time.perf_counter() - start)
        loc, q_cov = moments(guide, engine.get_params(state))
        kl = gaussian_kl(mean, cov, loc, q_cov) if np.all(np.isfinite(q_cov)) else float("nan")
        curve["calls"].append(check * updates_per_check * num_particles)
        curve["kl"].append(kl)
        curve["mean_rel_err"].append(float(np.linalg.norm(loc - mean) / np.linalg.norm(mean)))
        curve["cov_rel_err"].append(float(np.linalg.norm(q_cov - cov) / np.linalg.norm(cov)))
    seconds = np.median(chunk_seconds) / updates_per_check if chunk_seconds else float("nan")
    curve["seconds_per_iteration"] = float(seconds)
    rejected = getattr(state, "num_rejected", None)
    curve["num_rejected"] = int(rejected) if rejected is not None else 0
    return curve


def calls_to(curve: dict, threshold: float) -> int | None:
    return next((c for c, kl in zip(curve["calls"], curve["kl"], strict=True) if kl < threshold), None)


def minibatch_bias(num_updates: int, seed: int = 0) -> dict:
    """BaM vs ProximalScoreVI on linear regression, N=2000, B=20: final moments' errors."""
    rng = np.random.default_rng(seed)
    dim, n, batch = 5, 2000, 20
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x @ rng.normal(size=dim) + rng.normal(size=n)).astype(np.float32)
    exact_mean, exact_cov = conjugate_linear_regression(x, y, prior_scale=1.0, noise_scale=1.0)
    model = partial(linear_regression, subsample_size=batch)
    x, y = jnp.asarray(x), jnp.asarray(y)
    out = {}
    for method in ("bam", "psvi_full"):
        guide = AutoMultivariateNormal(model, init_loc_fn=init_to_value(values={"w": jnp.zeros(dim)}))
        if method == "bam":
            engine = BaM(model, guide, num_particles=8, learning_rate=1.0)
        else:  # a Robbins-Monro step decay, as in the conjugate-regression test
            engine = ProximalScoreVI(
                model, guide, optax.adam(lambda t: 3e-3 / (1 + t / 2000.0)), num_particles=8
            )
        state = engine.init(jax.random.PRNGKey(seed), x, y)

        def body(s, _, engine=engine, guide=guide):
            s, _ = engine.update(s, x, y)
            post = guide.get_posterior(engine.get_params(s))
            return s, (post.loc, post.covariance_matrix)

        _, (locs, covs) = jax.jit(lambda s, body=body: jax.lax.scan(body, s, None, length=num_updates))(state)
        tail = slice(num_updates // 2, None)  # average the second half of the iterates
        loc = np.asarray(locs[tail], np.float64).mean(0)
        q_cov = np.asarray(covs[tail], np.float64).mean(0)
        out[method] = {
            "mean_rel_err": float(np.linalg.norm(loc - exact_mean) / np.linalg.norm(exact_mean)),
            "cov_trace_ratio": float(np.trace(q_cov) / np.trace(exact_cov)),
            "kl": gaussian_kl(exact_mean, exact_cov, loc, q_cov),
        }
    return out


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)  # the D > 16 S advice; measured here
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D in {10, 50}, small budgets")
    args = parser.parse_args()
    if args.quick:
        dims, budgets, checks, mb_updates = (10, 50), {10: 400, 50: 800}, 4, 500
    else:
        dims = (10, 50, 100, 500)
        budgets, checks, mb_updates = {10: 2000, 50: 8000, 100: 8000, 500: 4000}, 20, 8000
    results = {"curves": {}, "seconds_per_iteration": {}}
    for dim in dims:
        num_particles = max(4, dim // 8)
        for cond_name, condition in CONDITIONS.items():
            mean, cov = ill_conditioned_gaussian(dim, condition, seed=0)
            for start_name, start_scale in STARTS.items():
                if dim == 500 and (cond_name, start_name) != ("ill", "standard"):
                    continue  # D=500: one configuration (the O(D^3) methods are slow)
                key = f"D={dim} {cond_name} {start_name} S={num_particles}"
                results["curves"][key] = {}
                for method in METHODS:
                    curve = fit_curve(method, mean, cov, start_scale, num_particles, budgets[dim], checks)
                    results["curves"][key][method] = curve
                    print(
                        f"{key:32s} {method:10s} final KL {curve['kl'][-1]:10.4g} "
                        f"calls to KL<0.01 {calls_to(curve, 0.01)} "
                        f"s/iter {curve['seconds_per_iteration']:.2e}",
                        flush=True,
                    )
    for key, by_method in results["curves"].items():
        if "ill standard" in key:
            dim = int(key.split()[0][2:])
            for method, curve in by_method.items():
                results["seconds_per_iteration"].setdefault(method, {})[dim] = curve["seconds_per_iteration"]
    results["minibatch_bias"] = minibatch_bias(mb_updates)
    print(results["minibatch_bias"])
    name = "gaussian_study_quick" if args.quick else "gaussian_study"
    print("wrote", save(name, {"quick": args.quick, **results}))
    if not args.quick:
        write_plots(results)


def write_plots(results: dict) -> None:
    for key, by_method in results["curves"].items():
        if "standard" not in key and "D=50" not in key:
            continue
        slug = key.replace(" ", "_").replace("=", "")
        plot_curves(
            {m: (c["calls"], np.maximum(c["kl"], 1e-6)) for m, c in by_method.items()},
            "score calls",
            "forward KL(target || q)",
            key,
            str(DOCS / f"gaussian_study_{slug}.png"),
            logy=True,
        )
    times = results["seconds_per_iteration"]
    plot_curves(
        {m: (list(t), list(t.values())) for m, t in times.items()},
        "D",
        "seconds per iteration",
        "wall time per iteration (ill, standard start)",
        str(DOCS / "gaussian_study_time.png"),
        logy=True,
    )


if __name__ == "__main__":
    main()
