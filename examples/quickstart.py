"""Quickstart: a Bayesian MLP on scikit-learn's digits, ProximalScoreVI vs ADVI.

Both engines fit the same AutoNormal guide with the same optimizer, particles and
budget of score calls; the script prints test accuracy, NLL and ECE and writes a PNG
of test NLL against score calls. Runs in under two minutes on two CPU cores.

    python examples/quickstart.py [--calls 20000] [--out quickstart.png]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_value

from numpyro_psvi import ProximalScoreVI
from numpyro_psvi.contrib.models import mlp_classifier, mlp_init_values
from psvi.contrib.datasets import load_digits
from psvi.contrib.plots import plot_curves
from psvi.metrics import classification_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000, help="score calls per method")
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--out", default="quickstart.png")
    args = parser.parse_args()

    data = load_digits()
    x_train, y_train, x_test, y_test = map(jnp.asarray, data)
    model = partial(mlp_classifier, subsample_size=args.batch)
    init = init_to_value(values=mlp_init_values(x_train.shape[1]))
    steps_per_chunk = args.calls // args.particles // args.checkpoints

    engines = {
        # The engine's defaults: with the model's subsampled plate it picks the
        # mini-batch settings (docs/minibatch.md).
        "ProximalScoreVI": lambda guide: ProximalScoreVI(
            model, guide, numpyro.optim.Adam(args.lr), num_particles=args.particles
        ),
        "ADVI (SVI, Trace_ELBO)": lambda guide: SVI(
            model, guide, numpyro.optim.Adam(args.lr), Trace_ELBO(num_particles=args.particles)
        ),
    }
    curves, reports = {}, {}
    for name, make in engines.items():
        guide = AutoNormal(model, init_loc_fn=init, init_scale=0.01)
        svi = make(guide)
        state = svi.init(jax.random.PRNGKey(0), x_train, y_train)
        # One compiled chunk of updates per engine (SVI.run would compile on every call).
        run_chunk = jax.jit(
            lambda s, svi=svi: jax.lax.scan(
                lambda s, _: svi.update(s, x_train, y_train), s, None, length=steps_per_chunk
            )[0]
        )
        calls, nlls = [], []
        start = time.perf_counter()
        for chunk in range(1, args.checkpoints + 1):
            state = run_chunk(state)
            predictive = Predictive(
                mlp_classifier,
                guide=guide,
                params=svi.get_params(state),
                num_samples=100,
                return_sites=["probs"],
            )
            probs = np.asarray(predictive(jax.random.PRNGKey(chunk), x_test)["probs"])
            reports[name] = classification_report(probs, np.asarray(y_test))
            calls.append(chunk * steps_per_chunk * args.particles)
            nlls.append(reports[name]["nll"])
        reports[name]["seconds"] = time.perf_counter() - start
        curves[name] = (calls, nlls)

    print(
        f"Bayesian MLP (64-50-10) on digits, {len(y_train)} train / {len(y_test)} test images, "
        f"{args.calls} score calls each, S={args.particles}, batch {args.batch}, Adam({args.lr})"
    )
    print(f"{'method':<24} {'accuracy':>9} {'NLL':>8} {'ECE':>8} {'seconds':>8}")
    for name, r in reports.items():
        print(f"{name:<24} {r['accuracy']:>9.4f} {r['nll']:>8.4f} {r['ece']:>8.4f} {r['seconds']:>8.1f}")
    plot_curves(curves, "score calls", "test NLL", "Bayesian MLP on digits", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
