"""NeuTra's two moons with AutoIAFNormal: which moon each fit covers, and whether
``mode_coverage`` sees the one it misses.

The target of NumPyro's ``examples/neutra.py`` (``x ~ Uniform(-4, 4)^2`` times the dual
moon density). AutoIAFNormal (2 flows, hidden 16-16) fitted by ProximalScoreVI and by
SVI (Trace_ELBO, 4 particles), Adam(1e-2), same seed, ``--steps`` updates; then the
fraction of 4000 guide draws with ``x_0 < 0`` (the exact posterior: 0.5) and
``numpyro_psvi.mode_coverage`` (32 searches). Also the ProximalScoreVI -ELBO every 100
updates up to ``--long`` updates (a flow fit that settles on one moon and later drifts).

    python -m benchmarks.two_moons [--steps 500] [--long 1400]
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoIAFNormal

from benchmarks.common import save
from numpyro_psvi import ProximalScoreVI, mode_coverage


def dual_moon_potential(x: jax.Array) -> jax.Array:
    term1 = 0.5 * ((jnp.linalg.norm(x, axis=-1) - 2) / 0.4) ** 2
    term2 = -0.5 * ((x[..., :1] + jnp.array([-2.0, 2.0])) / 0.6) ** 2
    return term1 - logsumexp(term2, axis=-1)


def dual_moon_model() -> None:
    x = numpyro.sample("x", dist.Uniform(-4 * jnp.ones(2), 4 * jnp.ones(2)).to_event(1))
    numpyro.factor("log_density", -dual_moon_potential(x))


def engine(method: str, guide):
    optim = numpyro.optim.Adam(1e-2)
    if method == "advi":
        return SVI(dual_moon_model, guide, optim, Trace_ELBO(num_particles=4))
    return ProximalScoreVI(dual_moon_model, guide, optim, max_consecutive_rejections=None)


def fit(method: str, steps: int) -> dict:
    guide = AutoIAFNormal(dual_moon_model, num_flows=2, hidden_dims=[16, 16])
    result = engine(method, guide).run(jax.random.PRNGKey(0), steps, progress_bar=False)
    draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(4000,))["x"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = mode_coverage(dual_moon_model, guide, result.params)
    return {
        "left_fraction": float((draws[:, 0] < 0).mean()),
        "searches": report.num_searches,
        "uncovered": report.num_uncovered,
        "uncovered_x0": sorted({round(float(-4 + 8 / (1 + np.exp(-u[0]))), 1) for u in report.uncovered}),
        "warned": any("misses posterior mass" in str(w.message) for w in caught),
    }


def long_run(steps: int) -> list[float]:
    guide = AutoIAFNormal(dual_moon_model, num_flows=2, hidden_dims=[16, 16])
    result = engine("psvi", guide).run(jax.random.PRNGKey(0), steps, progress_bar=False)
    losses = np.asarray(result.losses)
    return [float(np.nanmean(losses[i : i + 100])) for i in range(0, steps, 100)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--long", type=int, default=1400)
    options = parser.parse_args()
    rows = {method: fit(method, options.steps) for method in ("psvi", "advi")}
    payload = {"steps": options.steps, "fits": rows, "psvi_loss_per_100": long_run(options.long)}
    print(payload)
    save("two_moons", payload)


if __name__ == "__main__":
    main()
