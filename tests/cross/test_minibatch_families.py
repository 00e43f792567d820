"""User-written guides of non-Gaussian families under mini-batch scores (issue 19), both
backends: the exact posterior with the defaults on conjugate targets.

A Gamma guide for a Normal likelihood's precision and a Beta guide for a coin's bias,
``N = 2,000`` observations subsampled ``B = 100`` at a time: the exact posteriors are
Gamma and Beta, the guides' own families. Such guides go through the generic objective
(neither a Gaussian autoguide nor a flow): with the weight 10 and the last iterate their
sds ended 0.70-0.78 of the exact ones and their means up to 1.0 sd off
(``benchmarks/minibatch_families.py``); the defaults for this regime
(:func:`psvi.objective.generic_prox_weight`, averaged iterates) are what these tests hold.
"""

import numpy as np
import pytest
from scipy.special import digamma, polygamma

from psvi.objective import generic_prox_weight, regime_defaults

N, B, PRIOR, UPDATES = 2000, 100, 2.0, 3000


def data() -> tuple[np.ndarray, np.ndarray]:
    """Observations of precision 4 and flips of bias 0.3, float32."""
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 0.5, N).astype(np.float32), (rng.random(N) < 0.3).astype(np.float32)


def unconstrained_moments(target: str, a: float, b: float) -> tuple[float, float]:
    """Mean and sd of ``log tau``, ``tau ~ Gamma(a, b)``, or of ``logit p``, ``p ~ Beta(a, b)``."""
    if target == "precision":
        return float(digamma(a) - np.log(b)), float(np.sqrt(polygamma(1, a)))
    return float(digamma(a) - digamma(b)), float(np.sqrt(polygamma(1, a) + polygamma(1, b)))


def exact_posterior(target: str) -> tuple[float, float]:
    y, flips = data()
    if target == "precision":
        return PRIOR + N / 2, PRIOR + float(np.sum(y.astype(np.float64) ** 2)) / 2
    heads = float(flips.sum())
    return PRIOR + heads, PRIOR + N - heads


def check_fit(target: str, a: float, b: float) -> None:
    """The fitted ``(a, b)`` against the exact posterior, in its unconstrained coordinate:
    mean within 0.2 posterior sd, sd within 20%.

    Why these bounds can be met and fail when something is wrong: each update's optimum
    carries the batch's noise (the score's sum over the batch scaled by N/B = 20: about
    4.5 posterior sds in the location), which the averaged iterate (``i^5`` weights, ~0.31
    of the 3,000 updates' worth) and the reshuffled batches (an epoch's batches cancel at
    a fixed guide) reduce to the guide's movement within an epoch: measured 0.01-0.03 sd
    over three seeds in each backend, so 0.2 is far above it, while the last iterate of
    the weight 10 ended 0.05-1.0 sd off. The sd is the family's (``trigamma``), fitted from
    the averaged iterate's shape: measured 0.91-0.99 of the exact one, against 0.70-0.78
    with the weight 10 (a bias: the seeds agree to 0.03), so the 20% bound passes the
    worst seed now by 0.11 and fails every seed of the old bias (by 0.02-0.10).
    """
    mean, sd = unconstrained_moments(target, *exact_posterior(target))
    fitted_mean, fitted_sd = unconstrained_moments(target, a, b)
    assert abs(fitted_mean - mean) / sd < 0.2, (fitted_mean, mean, sd)
    assert abs(fitted_sd / sd - 1.0) < 0.2, (fitted_sd, sd)


def test_the_generic_objectives_weight_grows_with_the_batch_ratio_only_with_mini_batch_scores():
    assert regime_defaults(False, 1.0) == (20, False, 100, 10.0)  # exact scores: unchanged
    assert regime_defaults(False, 20.0) == (20, True, 100, 100.0)
    assert generic_prox_weight(1.5) == 10.0 and generic_prox_weight(80.0) == 400.0
    # Gaussian guides and flows keep their own regimes.
    assert regime_defaults(True, 20.0).prox_weight == 10.0
    assert regime_defaults(False, 20.0, transport=True).prox_weight == 10.0


def numpyro_fit(target: str, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    from numpyro_psvi import ProximalScoreVI

    y, flips = map(jnp.asarray, data())

    def model(y, flips):
        if target == "precision":
            tau = numpyro.sample("tau", dist.Gamma(PRIOR, PRIOR))
            with numpyro.plate("data", N, subsample_size=B) as idx:
                numpyro.sample("obs", dist.Normal(0.0, 1.0 / jnp.sqrt(tau)), obs=y[idx])
        else:
            p = numpyro.sample("p", dist.Beta(PRIOR, PRIOR))
            with numpyro.plate("data", N, subsample_size=B) as idx:
                numpyro.sample("obs", dist.Bernoulli(p), obs=flips[idx])

    def guide(y, flips):
        a = numpyro.param("a", 5.0, constraint=constraints.positive)
        b = numpyro.param("b", 5.0, constraint=constraints.positive)
        family = dist.Gamma if target == "precision" else dist.Beta
        numpyro.sample("tau" if target == "precision" else "p", family(a, b))

    svi = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
    result = svi.run(jax.random.PRNGKey(seed), UPDATES, y, flips, progress_bar=False)
    return svi, result


@pytest.mark.parametrize("target", ["precision", "coin"])
def test_numpyro_conjugate_guide_has_the_exact_posterior_under_mini_batch_scores(target):
    svi, result = numpyro_fit(target)
    assert (svi.objective.prox_weight, svi.average_iterates) == (100.0, True)
    assert int(result.state.num_rejected) == 0
    check_fit(target, float(result.params["a"]), float(result.params["b"]))


def pyro_engine(target: str):
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    from pyro_psvi import ProximalScoreVI

    def model(y, flips):
        if target == "precision":
            tau = pyro.sample("tau", dist.Gamma(PRIOR, PRIOR))
            with pyro.plate("data", N, subsample_size=B) as idx:
                pyro.sample("obs", dist.Normal(0.0, tau.rsqrt()), obs=y[idx])
        else:
            p = pyro.sample("p", dist.Beta(PRIOR, PRIOR))
            with pyro.plate("data", N, subsample_size=B) as idx:
                pyro.sample("obs", dist.Bernoulli(p), obs=flips[idx])

    def guide(y, flips):
        a = pyro.param("a", torch.tensor(5.0), constraint=constraints.positive)
        b = pyro.param("b", torch.tensor(5.0), constraint=constraints.positive)
        family = dist.Gamma if target == "precision" else dist.Beta
        pyro.sample("tau" if target == "precision" else "p", family(a, b))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2})), tuple(map(torch.tensor, data()))


def test_pyro_conjugate_guide_takes_the_generic_mini_batch_defaults():
    svi, args = pyro_engine("precision")
    svi.step(*args)
    assert (svi.objective.prox_weight, svi.average_iterates, svi.inner_steps) == (100.0, True, 20)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["precision", "coin"])
def test_pyro_conjugate_guide_has_the_exact_posterior_under_mini_batch_scores(target):
    """~2.5 min each: twenty inner steps of a guide the engine runs at each."""
    import pyro

    svi, args = pyro_engine(target)
    for _ in range(UPDATES):
        svi.step(*args)
    assert svi.num_rejected == 0
    store = pyro.get_param_store()
    check_fit(target, float(store["a"]), float(store["b"]))
