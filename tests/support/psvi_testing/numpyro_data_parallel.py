"""Data-parallel NumPyro fits on 4 host devices against the one-device fit.

Run as ``python -m psvi_testing.numpyro_data_parallel CASE DEVICES STEPS [--checkpoint
DIR]`` (this sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX
starts, so it needs its own process). Prints one JSON line: the largest absolute
difference between the final params and losses of the fit on ``DEVICES`` devices (a
plate ``subsample_size`` of ``16 / DEVICES`` each) and the one-device fit (``16``), both
in float64, the relative difference of ``evaluate`` and ``fisher_divergence`` after the
fit, and the counters. Cases: ``normal`` (AutoNormal), ``mvn``
(AutoMultivariateNormal), ``param`` (AutoNormal and a ``numpyro.param`` noise scale),
``user`` (a hand-written mean-field guide), ``enum`` (AutoNormal; each point's
enumerated discrete latent summed out).
With ``--checkpoint DIR`` the sharded fit is saved after ``STEPS // 2`` updates and
resumed on one device for the rest.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal  # noqa: E402

from numpyro_psvi import ProximalScoreVI  # noqa: E402

NUM_DATA, GLOBAL_BATCH = 64, 16


def data() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(NUM_DATA, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=NUM_DATA)
    return jnp.asarray(x), jnp.asarray(y)


def make_model(batch: int, learn_noise: bool, enumerated: bool = False):
    def model(x: jax.Array, y: jax.Array) -> None:
        w = numpyro.sample("w", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        if learn_noise:
            noise = numpyro.param("noise", 0.5, constraint=dist.constraints.positive)
        else:
            noise = 0.3
        with numpyro.plate("data", NUM_DATA, subsample_size=batch):
            xb, yb = numpyro.subsample(x, event_dim=1), numpyro.subsample(y, event_dim=0)
            shift = 0.0
            if enumerated:  # an outlier indicator per point, summed out
                shift = 2.0 * numpyro.sample("z", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
            numpyro.sample("y", dist.Normal(xb @ w + b + shift, noise), obs=yb)

    return model


def user_guide(x: jax.Array, y: jax.Array) -> None:
    positive = dist.constraints.positive
    loc_w = numpyro.param("loc_w", jnp.zeros(3))
    scale_w = numpyro.param("scale_w", jnp.full(3, 0.5), constraint=positive)
    loc_b = numpyro.param("loc_b", 0.0)
    scale_b = numpyro.param("scale_b", 0.5, constraint=positive)
    numpyro.sample("w", dist.Normal(loc_w, scale_w).to_event(1))
    numpyro.sample("b", dist.Normal(loc_b, scale_b))


def engine(case: str, devices: int) -> ProximalScoreVI:
    model = make_model(GLOBAL_BATCH // devices, case == "param", case == "enum")
    guides = {"user": user_guide, "mvn": AutoMultivariateNormal(model)}
    guide = guides.get(case) or AutoNormal(numpyro.handlers.block(model, hide=["z"]))
    mesh = jax.sharding.Mesh(jax.devices()[:devices], ("data",)) if devices > 1 else False
    return ProximalScoreVI(model, guide, numpyro.optim.Adam(0.05), data_parallel=mesh)


def fit(case: str, devices: int, steps: int, checkpoint: str | None = None) -> tuple:
    x, y = data()
    svi = engine(case, devices)
    if checkpoint is None:
        result = svi.run(jax.random.PRNGKey(0), steps, x, y, progress_bar=False)
        diagnostics = [svi.evaluate(result.state, x, y), svi.fisher_divergence(result.state, x, y)]
        return result.params, np.asarray(result.losses), result.state, np.asarray(diagnostics)
    first = svi.run(jax.random.PRNGKey(0), steps // 2, x, y, progress_bar=False)
    path = os.path.join(checkpoint, "fit.psvi")
    svi.save(path, first.state)
    resumed = engine(case, 1)
    state = resumed.load(path, x, y)
    second = resumed.run(None, steps - steps // 2, x, y, progress_bar=False, init_state=state)
    diagnostics = [resumed.evaluate(second.state, x, y), resumed.fisher_divergence(second.state, x, y)]
    return second.params, np.concatenate([first.losses, second.losses]), second.state, np.asarray(diagnostics)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["normal", "mvn", "param", "user", "enum"])
    parser.add_argument("devices", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--checkpoint")
    options = parser.parse_args()
    one_params, one_losses, one_state, one_diagnostics = fit(options.case, 1, options.steps)
    params, losses, state, diagnostics = fit(options.case, options.devices, options.steps, options.checkpoint)
    differences = {
        name: float(np.max(np.abs(np.asarray(params[name]) - np.asarray(value))))
        for name, value in one_params.items()
    }
    print(json.dumps({
        "params": differences,
        "losses": float(np.max(np.abs(losses - one_losses))),
        "diagnostics": float(np.max(np.abs(diagnostics / one_diagnostics - 1))),
        "num_score_calls": [int(one_state.num_score_calls), int(state.num_score_calls)],
        "num_rejected": [int(one_state.num_rejected), int(state.num_rejected)],
        "param_names": sorted(params),
        "dtype": str(np.asarray(one_losses).dtype),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
