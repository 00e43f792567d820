"""Mixture-of-Gaussians targets (the paper's Figure 2): ProximalScoreVI vs ADVI.

Targets: mixtures of full-covariance Gaussians, case 1: order 2 in D=2; case 2:
order 5 in D=2; case 3: order 2 in D=30; each with overlapping modes (spread 1: two
means ~1.4 apart, component sds ~1) and separated ones (spread 4: ~5.7 apart).
Guides: mixtures of diagonal Gaussians written as user guides (one
``MixtureSameFamily`` site), of the target's order and, in case 1, of order 3 too
(model mismatch); and AutoIAFNormal (cases 1 and 2; at D=30 its sequential inverse
costs ~0.2-1 s a step, docs/guides.md). ProximalScoreVI
(its defaults, S=4, Adam) against ADVI with the same guide and particles:
NumPyro's TraceGraph_ELBO for the mixture guides (their sampling is not
reparameterizable, so the ELBO gradient needs score-function terms) and Trace_ELBO
for the IAF (reparameterized). Both start from the same params. Recorded: forward
KL(target || q), by Monte Carlo on 4000 target draws, against score calls (model
gradient evaluations: S per step for both). NumPyro backend, CPU.

    python -m benchmarks.mixture_targets [--quick] [--guides iaf] [--methods psvi] [--seeds 3 4 5]
        [--spreads 4] [--every 10] [--reach 0.5] [--out NAME]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from numpyro.infer.autoguide import AutoIAFNormal

from benchmarks.common import save
from numpyro_psvi import ProximalScoreVI
from numpyro_psvi.guides import guide_density
from psvi.contrib.plots import plot_curves

DOCS = Path(__file__).parent.parent / "docs"
NUM_PARTICLES = 4
SPREADS = (1.0, 4.0)
CASES = {
    "case1_order2_d2": {"order": 2, "dim": 2, "guides": ("mixture2", "mixture3", "iaf")},
    "case2_order5_d2": {"order": 5, "dim": 2, "guides": ("mixture5", "iaf")},
    "case3_order2_d30": {"order": 2, "dim": 30, "guides": ("mixture2",)},
}


def make_target(order: int, dim: int, seed: int, spread: float) -> dist.Distribution:
    """Random weights in (0.5, 1.5) (normalized), means ``N(0, spread^2 / dim I)`` (two
    means lie ``spread * sqrt(2)`` apart on average, in any dimension), covariances
    ``A A'/dim + 0.3 I`` with ``A`` standard normal (component sds ~1)."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 1.5, order)
    means = spread / np.sqrt(dim) * rng.normal(size=(order, dim))
    factors = rng.normal(size=(order, dim, dim))
    covs = factors @ factors.transpose(0, 2, 1) / dim + 0.3 * np.eye(dim)
    return dist.MixtureSameFamily(
        dist.Categorical(probs=jnp.asarray(weights / weights.sum())),
        dist.MultivariateNormal(jnp.asarray(means), jnp.asarray(covs)),
    )


def mixture_guide(order: int, dim: int, seed: int):
    """A user-written mixture of ``order`` diagonal Gaussians; means start at N(0, I)."""
    init_locs = jnp.asarray(np.random.default_rng(1000 + seed).normal(size=(order, dim)))

    def guide():
        logits = numpyro.param("logits", jnp.zeros(order))
        locs = numpyro.param("locs", init_locs)
        scales = numpyro.param("scales", jnp.ones((order, dim)), constraint=constraints.positive)
        components = dist.Normal(locs, scales).to_event(1)
        numpyro.sample("x", dist.MixtureSameFamily(dist.Categorical(logits=logits), components))

    return guide


def run_one(
    case: dict, spread: float, guide_name: str, method: str, seed: int, steps: int, every: int, lr: float
):
    target = make_target(case["order"], case["dim"], seed, spread)

    def model():
        numpyro.sample("x", target)

    if guide_name == "iaf":
        guide = AutoIAFNormal(model, hidden_dims=[max(32, 2 * case["dim"])], num_flows=2)
        elbo = Trace_ELBO(num_particles=NUM_PARTICLES)
    else:
        guide = mixture_guide(int(guide_name.removeprefix("mixture")), case["dim"], seed)
        elbo = TraceGraph_ELBO(num_particles=NUM_PARTICLES)
    optim = optax.adam(lr)
    if method == "psvi":
        engine = ProximalScoreVI(model, guide, optim, num_particles=NUM_PARTICLES)
    else:
        engine = SVI(model, guide, optim, elbo)
    state = engine.init(jax.random.PRNGKey(seed))
    draws = target.sample(jax.random.PRNGKey(10_000 + seed), (4000,))
    density = guide_density(guide, model=model) if guide_name != "iaf" else guide_density(guide)

    @jax.jit
    def kl_of(params):  # compiled once: a check every few updates costs little
        return jnp.mean(target.log_prob(draws) - jax.vmap(lambda u: density.log_prob(params, u))(draws))

    def kl_now(state) -> float:
        return float(kl_of(engine.get_params(state)))

    def chunk(state, _):
        return engine.update(state)

    run_chunk = jax.jit(lambda state: jax.lax.scan(chunk, state, None, length=every)[0])
    calls, kls = [0], [kl_now(state)]
    start = time.perf_counter()
    for step in range(every, steps + 1, every):
        state = run_chunk(state)
        calls.append(step * NUM_PARTICLES)
        kls.append(kl_now(state))
    return {"calls": calls, "forward_kl": kls, "seconds": time.perf_counter() - start}


def calls_to_reach(run: dict, threshold: float) -> tuple[int | None, float]:
    """Score calls to the first check with forward KL below ``threshold`` (``None`` if
    none), and the share of the second half's checks below it."""
    kls, calls = run["forward_kl"], run["calls"]
    first = next((c for c, kl in zip(calls, kls, strict=True) if kl < threshold), None)
    late = kls[len(kls) // 2 :]
    return first, sum(kl < threshold for kl in late) / len(late)


def print_calls_to_reach(results: list[dict], threshold: float) -> None:
    """Per seed, calls to forward KL below ``threshold`` (late share in parentheses)."""
    print(f"\n| spread | case | guide | method | calls to forward KL < {threshold} per seed (late share) |")
    print("| --- | --- | --- | --- | --- |")
    keys = dict.fromkeys((r["spread"], r["case"], r["guide"], r["method"]) for r in results)
    for key in keys:
        runs = sorted((r for r in results if (r["spread"], r["case"], r["guide"], r["method"]) == key),
                      key=lambda r: r["seed"])  # fmt: skip
        cells = []
        for run in runs:
            first, late = calls_to_reach(run, threshold)
            cells.append(f"{'-' if first is None else first} ({late:.2f})")
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {', '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="case 1, one seed, 200 steps")
    parser.add_argument("--guides", nargs="+", help="only these guides (e.g. iaf); no table or plots")
    parser.add_argument("--methods", nargs="+", default=["psvi", "advi"], choices=["psvi", "advi"])
    parser.add_argument("--out", help="name of the JSON in benchmarks/results (default mixture_targets)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2); no table or plots")
    parser.add_argument("--spreads", nargs="+", type=float, help=f"of {SPREADS}; no table or plots")
    parser.add_argument("--every", type=int, help="updates between checks (default 100; 50 with --quick)")
    parser.add_argument("--reach", type=float, default=0.5, help="forward KL of the calls-to-reach table")
    options = parser.parse_args()
    partial_run = options.quick or len(options.methods) < 2
    partial_run |= any(given is not None for given in (options.guides, options.seeds, options.spreads))
    cases = {"case1_order2_d2": CASES["case1_order2_d2"]} if options.quick else CASES
    seeds = (0,) if options.quick else tuple(options.seeds or (0, 1, 2))
    steps, every = (200, 50) if options.quick else (1500, 100)
    every = options.every or every
    if every < 1 or steps % every:
        parser.error(f"--every must be a positive divisor of the {steps} steps, got {every}")
    spreads = (1.0,) if options.quick else tuple(options.spreads or SPREADS)
    results = []
    for spread in spreads:
        for case_name, case in cases.items():
            for guide_name in case["guides"]:
                if options.guides is not None and guide_name not in options.guides:
                    continue
                for method in options.methods:
                    for seed in seeds:
                        lr = 0.01 if guide_name == "iaf" else 0.05
                        out = run_one(case, spread, guide_name, method, seed, steps, every, lr)
                        results.append({"case": case_name, "spread": spread, "guide": guide_name,
                                        "method": method, "seed": seed, "lr": lr, **out})  # fmt: skip
                        print(f"spread {spread} {case_name} {guide_name:8s} {method:4s} seed {seed}: "
                              f"forward KL {out['forward_kl'][0]:.3g} -> {out['forward_kl'][-1]:.3g} "
                              f"({out['seconds']:.1f} s)", flush=True)  # fmt: skip
    name = options.out or ("mixture_targets_quick" if options.quick else "mixture_targets")
    path = save(name, {"num_particles": NUM_PARTICLES, "steps": steps, "results": results})
    print(f"wrote {path}")
    print_calls_to_reach(results, options.reach)
    if partial_run:
        return
    print("\n| spread | case | guide | ProximalScoreVI | ADVI |\n|---|---|---|---|---|")
    for spread in spreads:
        for case_name, case in cases.items():
            curves = {}
            for guide_name in case["guides"]:
                cells = []
                for method in ("psvi", "advi"):
                    key = (spread, case_name, guide_name, method)
                    runs = [r for r in results if (r["spread"], r["case"], r["guide"], r["method"]) == key]
                    finals = np.array([r["forward_kl"][-1] for r in runs])
                    median = np.median(np.array([r["forward_kl"] for r in runs]), axis=0)
                    label = {"psvi": "ProximalScoreVI", "advi": "ADVI"}[method]
                    curves[f"{label}, {guide_name}"] = (runs[0]["calls"], np.maximum(median, 1e-4))
                    cells.append(f"{np.median(finals):.3g} [{finals.min():.3g}, {finals.max():.3g}]")
                print(f"| {spread} | {case_name} | {guide_name} | {cells[0]} | {cells[1]} |")
            title = f"{case_name}, spread {spread}"
            path = DOCS / f"mixture_{case_name}_spread{spread:g}.png"
            plot_curves(curves, "score calls", "forward KL(target || q), median of 3 seeds", title,
                        str(path), logy=True)  # fmt: skip


if __name__ == "__main__":
    main()
