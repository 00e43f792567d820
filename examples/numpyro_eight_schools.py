"""Eight schools in NumPyro: ProximalScoreVI, then ArviZ and the VI diagnostics.

The non-centered eight schools model (Rubin 1981; NumPyro's ``examples/``), fitted
with ``AutoMultivariateNormal`` and the user's ``Adam(1e-2)``, exported with
``to_inference_data`` (its ``sample_stats`` hold the fit's PSIS k-hat, ELBO and Fisher
divergence), summarized with ArviZ, and compared with NUTS (``--nuts``).

    python examples/numpyro_eight_schools.py [--steps 3000] [--nuts]
"""

from __future__ import annotations

import argparse

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.reparam import TransformReparam

from numpyro_psvi import ProximalScoreVI, to_inference_data

Y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma: jax.Array, y: jax.Array | None = None) -> None:
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", len(sigma)):
        with numpyro.handlers.reparam(config={"theta": TransformReparam()}):
            shifted = dist.TransformedDistribution(
                dist.Normal(0.0, 1.0), dist.transforms.AffineTransform(mu, tau)
            )
            theta = numpyro.sample("theta", shifted)
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--nuts", action="store_true", help="also run NUTS for reference")
    args = parser.parse_args()

    guide = AutoMultivariateNormal(eight_schools)
    engine = ProximalScoreVI(eight_schools, guide, numpyro.optim.Adam(1e-2))
    result = engine.run(jax.random.PRNGKey(0), args.steps, SIGMA, Y, progress_bar=False)
    print(f"-ELBO estimate, mean of the last 100 updates: {float(np.mean(result.losses[-100:])):.3f}")

    idata = to_inference_data(
        eight_schools, guide, result.params, SIGMA, Y,
        losses=result.losses, num_score_calls=result.state.num_score_calls,
    )  # fmt: skip
    print(az.summary(idata, var_names=["mu", "tau", "theta"], kind="stats"))
    stats = idata.sample_stats
    print(
        f"\nHow good is the fit (sample_stats): PSIS k-hat {stats['khat'].item():.2f} "
        f"(below 0.7: importance-corrected estimates are reliable), ELBO {stats['elbo'].item():.3f}, "
        f"Fisher divergence {stats['fisher'].item():.3g}; {stats['num_score_calls'].item()} score calls."
    )
    print("(The pseudo-chains' ESS and R-hat describe nothing for iid draws: ", end="")
    print(idata.posterior.attrs["draws"] + ".)")

    if args.nuts:
        mcmc = MCMC(NUTS(eight_schools), num_warmup=1000, num_samples=2000, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(1), SIGMA, Y)
        reference = mcmc.get_samples()
        post = idata.posterior
        for name in ("mu", "tau"):
            fitted, exact = np.asarray(post[name]), np.asarray(reference[name])
            print(
                f"{name}: ProximalScoreVI mean {fitted.mean():6.2f} sd {fitted.std():5.2f} | "
                f"NUTS mean {exact.mean():6.2f} sd {exact.std():5.2f}"
            )


if __name__ == "__main__":
    main()
