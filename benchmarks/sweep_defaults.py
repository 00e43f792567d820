"""Sweep S, K, prox_weight, trust region and weighting on a Gaussian target and the
digits BNN; the defaults of ``numpyro_psvi.ProximalScoreVI`` come from this sweep.

Run: ``python benchmarks/sweep_defaults.py`` (about 10 minutes on 2 CPU cores);
writes ``benchmarks/results/sweep_defaults.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks.common import digits_fit, gaussian_calls_to_kl, make_engine, save
from psvi.contrib.targets import ill_conditioned_gaussian

jax.config.update("jax_enable_x64", False)

CONFIGS = [
    # (S, K, prox_weight, trust_region, weighting); the first row is the default.
    (4, 20, 10.0, 0.5, "covariance"),
    (4, 10, 10.0, 0.5, "covariance"),
    (4, 5, 10.0, 0.5, "covariance"),
    (4, 20, 10.0, 0.05, "covariance"),
    (4, 20, 10.0, None, "covariance"),
    (4, 20, 3.0, 0.1, "covariance"),
    (4, 10, 1.0, 0.1, "covariance"),
    (4, 5, 1.0, 0.1, "covariance"),
    (4, 20, 10.0, 0.5, "identity"),
    (2, 20, 10.0, 0.5, "covariance"),
    (8, 20, 10.0, 0.5, "covariance"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=30)
    parser.add_argument("--condition", type=float, default=1e3)
    parser.add_argument("--gauss-calls", type=int, default=8000)
    parser.add_argument("--bnn-calls", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    mean, cov = ill_conditioned_gaussian(args.dim, args.condition, seed=0)
    rows = []
    print(
        "| S | K | prox_weight | trust_region | weighting | Gaussian calls to KL<0.1 / <0.01 "
        "| digits NLL | ECE | acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for S, K, pw, tr, weighting in CONFIGS:
        options = dict(inner_steps=K, prox_weight=pw, trust_region=tr, weighting=weighting)

        def make(model, guide, S=S, options=options):
            return make_engine("psvi", model, guide, args.lr, S, **options)

        gauss = gaussian_calls_to_kl(mean, cov, make, S, args.gauss_calls)
        bnn = digits_fit(make, args.bnn_calls, S)
        row = {"num_particles": S, **options, "gaussian": gauss, "digits": bnn}
        rows.append(row)
        hits = gauss["calls_to_kl"]
        print(
            f"| {S} | {K} | {pw} | {tr} | {weighting} | {hits['0.1']} / {hits['0.01']} "
            f"(final {gauss['final_kl']:.3g}) | {bnn['nll']:.4f} | {bnn['ece']:.4f} "
            f"| {bnn['accuracy']:.4f} |",
            flush=True,
        )
    advi = {}
    for lr in (1e-3, 1e-2):

        def make(model, guide, lr=lr):
            return make_engine("advi", model, guide, lr, 4)

        advi[str(lr)] = {
            "gaussian": gaussian_calls_to_kl(mean, cov, make, 4, args.gauss_calls),
            "digits": digits_fit(make, args.bnn_calls, 4),
        }
        g, b = advi[str(lr)]["gaussian"], advi[str(lr)]["digits"]
        print(
            f"| ADVI lr={lr} (S=4) | | | | | {g['calls_to_kl']['0.1']} / {g['calls_to_kl']['0.01']} "
            f"(final {g['final_kl']:.3g}) | {b['nll']:.4f} | {b['ece']:.4f} | {b['accuracy']:.4f} |"
        )
    save("sweep_defaults", {"args": vars(args), "psvi": rows, "advi": advi})


if __name__ == "__main__":
    main()
