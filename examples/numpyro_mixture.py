"""A Gaussian mixture in NumPyro with enumerated assignments: ProximalScoreVI beside SVI.

Each point's component ``z_i`` is a discrete latent marked for parallel enumeration
(``config_enumerate``), as ``TraceEnum_ELBO`` needs it; ProximalScoreVI sums it out of
its scores the same way, so the guide (AutoNormal, the assignments hidden from it) fits
the weights and locations only, here on mini-batches of the model's own plate. After the
fit, ``Predictive(..., infer_discrete=True)`` draws the assignments given the fitted
continuous latents, as after SVI.

    python examples/numpyro_mixture.py [--steps 2000] [--batch 100]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.funsor import config_enumerate
from numpyro.infer import SVI, Predictive, TraceEnum_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.ops.indexing import Vindex

from numpyro_psvi import ProximalScoreVI

CENTRES, SIZES = np.array([-4.0, 0.0, 5.0]), np.array([300, 200, 100])


def data() -> tuple[jax.Array, np.ndarray]:
    """600 points from three unit-variance components, and their components."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), SIZES)
    return jnp.asarray(rng.normal(CENTRES[labels], 1.0), jnp.float32), labels


@config_enumerate
def mixture(x: jax.Array, batch: int | None = None) -> None:
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(3)))
    # Ordered locations: one labelling of the components, so the posterior has one mode.
    locs = numpyro.sample(
        "locs",
        dist.TransformedDistribution(dist.Normal(0.0, 10.0).expand([3]), dist.transforms.OrderedTransform()),
    )
    with numpyro.plate("data", len(x), subsample_size=batch) as i:
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("x", dist.Normal(Vindex(locs)[..., z], 1.0), obs=x[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    x, labels = data()
    guide = AutoNormal(handlers.block(mixture, hide=["z"]))
    engines = {
        "ProximalScoreVI": ProximalScoreVI(mixture, guide, numpyro.optim.Adam(1e-2)),
        "SVI(TraceEnum_ELBO)": SVI(mixture, guide, numpyro.optim.Adam(1e-2), TraceEnum_ELBO(num_particles=4)),
    }
    for name, engine in engines.items():
        result = engine.run(jax.random.PRNGKey(0), args.steps, x, args.batch, progress_bar=False)
        draws = Predictive(guide, params=result.params, num_samples=1000)(jax.random.PRNGKey(1), x)
        locs, weights = np.asarray(draws["locs"]), np.asarray(draws["weights"])
        print(f"{name}: locs means {np.round(locs.mean(0), 3)} sds {np.round(locs.std(0), 3)}")
        print(f"{name}: weights means {np.round(weights.mean(0), 3)}")
        # The assignments given the fitted continuous latents, over all points.
        assigned = Predictive(mixture, guide=guide, params=result.params, num_samples=1, infer_discrete=True)(
            jax.random.PRNGKey(2), x
        )["z"][0]
        print(f"{name}: assignments that match the generating components {np.mean(assigned == labels):.3f}")


if __name__ == "__main__":
    main()
