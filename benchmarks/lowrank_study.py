"""AutoLowRankMultivariateNormal with exact scores: ProximalScoreVI against ADVI with the
same guide (issue 20, item 2; NumPyro).

Target: ``N(m, F F' + diag(d))`` in ``D`` dimensions, ``F`` of rank ``R`` (entries
``N(0, 4/R)``), ``d`` log-uniform in (0.05, 1), ``m ~ N(0, I)``: a low-rank-plus-diagonal
Gaussian that the guide of rank ``R`` represents exactly. Both methods start from the
guide's defaults (``loc = 0``, ``init_scale = 0.1``), take ``S`` particles per update and
Adam(1e-2); the forward ``KL(target || q)`` (closed form, float64, by Woodbury) at ten
checks. ``psvi`` takes the engine's defaults (the closed-form step of
``numpyro_psvi.objective.lowrank_proximal_step``); ``psvi_optimizer`` the optimizer's
``K = 20`` inner steps of the earlier default (``--optimizer``: it takes minutes at
``D = 10,000``). AutoDiagonalNormal (``psvi_diag``) and, where ``D <= 100``,
AutoMultivariateNormal (``psvi_full``: the closed-form step) fitted by ProximalScoreVI are
shown too.

``python -m benchmarks.lowrank_study [--dims 100 1000 10000] [--optimizer] [--out NAME]``
writes ``benchmarks/results/lowrank_study.json`` (or ``NAME.json``) and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal
from numpyro.infer.initialization import init_to_value

from benchmarks.common import save
from numpyro_psvi import ProximalScoreVI
from psvi.metrics import gaussian_kl

NUM_CHECKS = 10


def target(dim: int, rank: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(dim, rank)) * 2.0 / np.sqrt(rank)
    diag = np.exp(rng.uniform(np.log(0.05), np.log(1.0), size=dim))
    return rng.normal(size=dim), factor, diag


def _precision_times(factor: np.ndarray, diag: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(F F' + diag(d))^{-1} v`` by Woodbury."""
    dinv_f = factor / diag[:, None]
    capacitance = np.eye(factor.shape[1]) + factor.T @ dinv_f
    dinv_v = v / diag[:, None]
    return dinv_v - dinv_f @ np.linalg.solve(capacitance, factor.T @ dinv_v)


def _logdet(factor: np.ndarray, diag: np.ndarray) -> float:
    capacitance = np.eye(factor.shape[1]) + factor.T @ (factor / diag[:, None])
    return float(np.linalg.slogdet(capacitance)[1] + np.sum(np.log(diag)))


def lowrank_kl(mean0, factor0, diag0, mean1, factor1, diag1) -> float:
    """``KL(N(mean0, F0 F0' + D0) || N(mean1, F1 F1' + D1))`` in float64, ``O(D R^2)``."""
    dinv_f1 = factor1 / diag1[:, None]
    capacitance1 = np.eye(factor1.shape[1]) + factor1.T @ dinv_f1
    # tr(S1^-1 D0) = sum(d0 / d1) - tr(D1^-1 F1 C^-1 F1' D1^-1 D0)
    trace = np.sum(diag0 / diag1) - np.sum(
        dinv_f1 * np.linalg.solve(capacitance1, dinv_f1.T).T * diag0[:, None]
    )
    trace += np.sum(factor0 * _precision_times(factor1, diag1, factor0))
    delta = (mean1 - mean0)[:, None]
    quad = float((delta.T @ _precision_times(factor1, diag1, delta))[0, 0])
    return 0.5 * (trace + quad - mean0.size + _logdet(factor1, diag1) - _logdet(factor0, diag0))


def forward_kl(method: str, guide, params, mean, factor, diag) -> float:
    """``KL(target || q)`` of the fitted guide: by Woodbury for the diagonal and low-rank
    guides, densely for AutoMultivariateNormal."""
    posterior = guide.get_posterior(params)
    loc = np.asarray(posterior.mean, np.float64)
    if method == "psvi_full":
        cov = np.asarray(posterior.covariance_matrix, np.float64)
        return gaussian_kl(mean, factor @ factor.T + np.diag(diag), loc, cov)
    if method == "psvi_diag":
        return lowrank_kl(
            mean, factor, diag, loc, np.zeros((loc.size, 1)), np.asarray(posterior.variance, np.float64)
        )
    cov_factor, cov_diag = (np.asarray(a, np.float64) for a in (posterior.cov_factor, posterior.cov_diag))
    return lowrank_kl(mean, factor, diag, loc, cov_factor, cov_diag)


def fit(method: str, dim: int, rank: int, num_particles: int, updates: int, **psvi_options) -> dict:
    """KL curve of one method; ``psvi_options`` go to ``ProximalScoreVI``."""
    mean, factor, diag = target(dim, rank)
    as_f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    def model():
        numpyro.sample("x", dist.LowRankMultivariateNormal(as_f32(mean), as_f32(factor), as_f32(diag)))

    init = init_to_value(values={"x": jnp.zeros(dim)})
    if method == "psvi_full":
        guide = AutoMultivariateNormal(model, init_loc_fn=init)
    elif method == "psvi_diag":
        guide = AutoDiagonalNormal(model, init_loc_fn=init)
    else:
        guide = AutoLowRankMultivariateNormal(model, rank=rank, init_loc_fn=init)
    optim = numpyro.optim.Adam(1e-2)
    if method == "advi":
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles))
    else:
        if method == "psvi_optimizer":
            psvi_options = {"inner_solver": "optimizer", **psvi_options}
        engine = ProximalScoreVI(model, guide, optim, num_particles=num_particles, **psvi_options)
    state = engine.init(jax.random.PRNGKey(0))
    per_check = max(updates // NUM_CHECKS, 1)
    chunk = jax.jit(lambda s: jax.lax.scan(lambda s, _: engine.update(s), s, None, length=per_check)[0])
    curve = {"calls": [], "kl": [], "seconds": []}
    start = time.perf_counter()
    for check in range(1, NUM_CHECKS + 1):
        state = jax.block_until_ready(chunk(state))
        curve["seconds"].append(time.perf_counter() - start)
        curve["calls"].append(check * per_check * num_particles)
        curve["kl"].append(forward_kl(method, guide, engine.get_params(state), mean, factor, diag))
    return curve


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)  # set-up advice; measured here
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", nargs="+", type=int, default=[100, 1000, 10000])
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--updates-at-1e4", type=int, default=2000, help="updates at D >= 10,000")
    parser.add_argument("--optimizer", action="store_true", help="also the optimizer path (psvi_optimizer)")
    parser.add_argument("--out", default="lowrank_study")
    opts = parser.parse_args()
    results = {"rank": opts.rank, "num_particles": opts.particles, "curves": {}}
    for dim in opts.dims:
        updates = opts.updates if dim < 10_000 else opts.updates_at_1e4
        methods = ["advi", "psvi"] + (["psvi_optimizer"] if opts.optimizer else []) + ["psvi_diag"]
        methods += ["psvi_full"] if dim <= 100 else []
        for method in methods:
            curve = fit(method, dim, opts.rank, opts.particles, updates)
            results["curves"].setdefault(str(dim), {})[method] = curve
            kls = ", ".join(f"{k:.3g}" for k in curve["kl"])
            print(f"D={dim} {method}: KL {kls} ({curve['seconds'][-1]:.0f} s)", flush=True)
    print("wrote", save(opts.out, results))
    print("\n| D | updates | method | KL at 10% / 50% / 100% of the calls | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for dim, by_method in results["curves"].items():
        for method, curve in by_method.items():
            kl = curve["kl"]
            calls = curve["calls"][-1] // opts.particles
            kls = f"{kl[0]:.3g} / {kl[4]:.3g} / {kl[-1]:.3g}"
            print(f"| {dim} | {calls} | {method} | {kls} | {curve['seconds'][-1]:.0f} |")


if __name__ == "__main__":
    main()
