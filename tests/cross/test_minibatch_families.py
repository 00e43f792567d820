"""User-written guides of non-Gaussian families under mini-batch scores (issue 19), both
backends: the exact posterior with the defaults on conjugate targets.

A Gamma guide for a Normal likelihood's precision and a Beta guide for a coin's bias,
``N = 2,000`` observations subsampled ``B = 100`` at a time: the exact posteriors are
Gamma and Beta, the guides' own families. The conjugate ``(a, b)`` guides' updates are
solved exactly (``inner_solver="closed_form"``, the default for guides with linear
scores) at the weight ``max(10, t)``; with the weight 10 and the last iterate their sds
ended 0.70-0.78 of the exact ones and their means up to 1.0 sd off, and twenty Adam(1e-3)
steps an update were 1.8-2.2x wide after 3,000 updates (``benchmarks/minibatch_families.py``).
The mean-and-shape guide (no solve: its args are computed) takes the generic objective's
defaults (:func:`psvi.objective.generic_prox_weight`, averaged iterates).
"""

import numpy as np
import pytest

from psvi.contrib.targets import (
    conjugate_data,
    conjugate_mean_args,
    conjugate_posterior,
    conjugate_unconstrained_moments,
)
from psvi.objective import generic_prox_weight, regime_defaults

B, UPDATES = 100, 3000
TARGETS = ["precision", "coin"]


def target_data(target: str) -> np.ndarray:
    """The target's N = 2,000 observations."""
    return conjugate_data()[TARGETS.index(target)]


def check_fit(target: str, a: float, b: float) -> None:
    """The fitted ``(a, b)`` against the exact posterior, in its unconstrained coordinate:
    mean within 0.2 posterior sd, sd within 20%.

    Why these bounds can be met and fail when something is wrong: each update's optimum
    carries the batch's noise (the score's sum over the batch scaled by N/B = 20: about
    4.5 posterior sds in the location), which the weight ``t`` (each update a ``1/t``
    share: the running mean of the batches' solutions), the averaged iterate (``i^5``
    weights) and the reshuffled batches (an epoch's batches cancel at a fixed guide) reduce
    to 0.00-0.02 sd (Pyro) and 0.01-0.06 sd (NumPyro's float32 solve; 0.00 with x64) over
    three seeds, so 0.2 is far above it, while the last iterate of the weight 10 ended
    0.05-1.0 sd off. The sd is the family's (``trigamma``), fitted from the averaged
    iterate's shape: measured 0.95-1.04 of the exact one (the mean-and-shape guide's
    generic defaults: 0.89-0.98), against 0.70-0.78 with the weight 10 (a bias: the seeds
    agree to 0.03) and 1.8-2.2 for twenty Adam(1e-3) steps, so the 20% bound fails every
    seed of either.
    """
    mean, sd = conjugate_unconstrained_moments(target, *conjugate_posterior(target, target_data(target)))
    fitted_mean, fitted_sd = conjugate_unconstrained_moments(target, a, b)
    assert abs(fitted_mean - mean) / sd < 0.2, (fitted_mean, mean, sd)
    assert abs(fitted_sd / sd - 1.0) < 0.2, (fitted_sd, sd)


def test_the_generic_objectives_weight_grows_with_the_batch_ratio_only_with_mini_batch_scores():
    assert regime_defaults(False, 1.0) == (20, False, 100, 10.0, 0.0, None)  # exact scores: unchanged
    assert regime_defaults(False, 20.0) == (20, True, 100, 100.0, 0.0, None)
    assert generic_prox_weight(1.5) == 10.0 and generic_prox_weight(80.0) == 400.0
    # A low-rank Gaussian takes the Gaussian guides' five steps with mini-batch scores only.
    assert regime_defaults(False, 20.0, low_rank=True) == (5, True, 100, 100.0, 0.0, None)
    assert regime_defaults(False, 1.0, low_rank=True) == (20, False, 100, 10.0, 0.0, None)
    # Gaussian guides and flows keep their own regimes.
    assert regime_defaults(True, 20.0).prox_weight == 10.0
    assert regime_defaults(False, 20.0, transport=True).prox_weight == 10.0


def numpyro_fit(target: str, lr: float):
    import jax
    import jax.numpy as jnp
    import numpyro

    from numpyro_psvi import ProximalScoreVI
    from numpyro_psvi.contrib.models import coin_model, conjugate_guide, precision_model

    model = precision_model if target == "precision" else coin_model
    svi = ProximalScoreVI(model, conjugate_guide(target), numpyro.optim.Adam(lr))
    data = jnp.asarray(target_data(target))
    result = svi.run(jax.random.PRNGKey(0), UPDATES, data, subsample_size=B, progress_bar=False)
    return svi, result


@pytest.mark.parametrize("target", TARGETS)
def test_numpyro_mean_and_shape_guide_arrives_from_a_far_start_at_adam_1e_3(target):
    """The conjugate family from the same start (``Gamma(5, 5)``, ``Beta(5, 5)``),
    parameterized by mean and shape (``conjugate_mean_guide``), at the user's Adam(1e-3):
    the exact posterior within :func:`check_fit`'s bounds after the same 3,000 updates,
    where the args' parameterization is still 1.8-2.2x too wide (docs/minibatch.md section
    15: the ill-conditioning of ``(log a, log b)`` under Adam's per-coordinate steps)."""
    import jax
    import jax.numpy as jnp
    import numpyro

    from numpyro_psvi import ProximalScoreVI
    from numpyro_psvi.contrib.models import coin_model, conjugate_mean_guide, precision_model

    model = precision_model if target == "precision" else coin_model
    svi = ProximalScoreVI(model, conjugate_mean_guide(target), numpyro.optim.Adam(1e-3))
    data = jnp.asarray(target_data(target))
    result = svi.run(jax.random.PRNGKey(0), UPDATES, data, subsample_size=B, progress_bar=False)
    check_fit(target, *conjugate_mean_args(target, float(result.params["k"]), float(result.params["m"])))


@pytest.mark.parametrize("target", TARGETS)
def test_numpyro_conjugate_guide_has_the_exact_posterior_under_mini_batch_scores(target):
    """At the user's Adam(1e-3), from the far start ``a = b = 5``: the exact solve does not
    read the learning rate (the same fit at Adam(1e-2), benchmarks/results/
    minibatch_families_numpyro_growing_u3000*.json)."""
    svi, result = numpyro_fit(target, 1e-3)
    assert (svi.inner_solver, svi.objective.prox_weight, svi.prox_weight_growth) == ("closed_form", 10.0, 1.0)
    assert svi.average_iterates
    assert int(result.state.num_rejected) == 0
    check_fit(target, float(result.params["a"]), float(result.params["b"]))


def pyro_engine(target: str):
    import pyro
    import torch

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import coin_model, conjugate_guide, precision_model

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = precision_model if target == "precision" else coin_model
    svi = ProximalScoreVI(model, conjugate_guide(target), pyro.optim.Adam({"lr": 1e-2}))
    return svi, torch.tensor(target_data(target))


def test_pyro_conjugate_guide_takes_the_exact_solve_at_a_growing_weight():
    svi, data = pyro_engine("precision")
    svi.step(data, subsample_size=B)
    assert (svi.inner_solver, svi.objective.prox_weight, svi.prox_weight_growth) == ("closed_form", 10.0, 1.0)
    assert svi.average_iterates


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_pyro_conjugate_guide_has_the_exact_posterior_under_mini_batch_scores(target):
    """~1 min each (3,000 updates of the exact solve), at the user's Adam(1e-2)."""
    import pyro

    svi, data = pyro_engine(target)
    for _ in range(UPDATES):
        svi.step(data, subsample_size=B)
    assert svi.num_rejected == 0
    store = pyro.get_param_store()
    check_fit(target, float(store["a"]), float(store["b"]))
