"""Score calls to reach forward KL < 0.1 and < 0.01 on ill-conditioned Gaussian targets.

ProximalScoreVI (defaults) against ADVI (SVI with Trace_ELBO), same
AutoMultivariateNormal guide from N(0, 0.1^2 I), same S and Adam learning rate.

Run: ``python -m benchmarks.gaussian_targets`` (writes
``benchmarks/results/gaussian_targets.json`` and prints a markdown table).
"""

from __future__ import annotations

import argparse
import itertools
import warnings

from benchmarks.common import gaussian_calls_to_kl, make_engine, save
from psvi.contrib.targets import ill_conditioned_gaussian


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)  # the D > 16 S advice; measured here
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--condition", type=float, default=1e3)
    parser.add_argument("--max-calls", type=int, default=20000)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows = []
    print(f"condition number {args.condition:g}, S={args.particles}, budget {args.max_calls} score calls")
    print("| D | method | Adam lr | seed | calls to KL < 0.1 | calls to KL < 0.01 | final KL | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        mean, cov = ill_conditioned_gaussian(dim, args.condition, seed=0)
        for method, lr, seed in itertools.product(("psvi", "advi"), args.lrs, args.seeds):

            def make(model, guide, method=method, lr=lr):
                return make_engine(method, model, guide, lr, args.particles)

            r = gaussian_calls_to_kl(mean, cov, make, args.particles, args.max_calls, seed=seed)
            rows.append({"dim": dim, "method": method, "lr": lr, "seed": seed, **r})
            hits = r["calls_to_kl"]
            print(
                f"| {dim} | {method} | {lr} | {seed} | {hits['0.1']} | {hits['0.01']} "
                f"| {r['final_kl']:.3g} | {r['seconds']:.1f} |",
                flush=True,
            )
    save("gaussian_targets", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
