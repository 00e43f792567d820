"""The loss every engine reports is SVI's: the -ELBO estimate from the step's particles.

Checked against closed forms in both packages. At the exact posterior ``log p(y, z) -
log q(z) = log p(y)`` for every particle, so the estimate equals ``-log p(y)`` up to
float32 round-off (relative 1e-4 for sums of a few dozen O(10) terms); with local latents
in a subsampled plate, each row contributes ``log p(y_i)`` and the estimate is ``N/B``
times a mini-batch's sum, whose mean over batches is the full sum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402
from numpyro.infer import init_to_value as n_init_to_value  # noqa: E402
from numpyro.infer.autoguide import AutoNormal as NAutoNormal  # noqa: E402
from pyro.infer.autoguide import AutoNormal as PAutoNormal  # noqa: E402
from pyro.infer.autoguide import init_to_value as p_init_to_value  # noqa: E402

import numpyro_psvi  # noqa: E402
import pyro_psvi  # noqa: E402
from numpyro_psvi.batches import init_epoch_order  # noqa: E402

Y = np.random.default_rng(0).normal(1.0, 1.0, size=10)


def _evidence(y: np.ndarray) -> float:
    """``log N(y; 0, I + 11')`` of ``x ~ N(0, 1), y_i ~ N(x, 1)`` (Sherman-Morrison)."""
    n = len(y)
    quad = y @ y - y.sum() ** 2 / (1 + n)
    return -0.5 * (n * math.log(2 * math.pi) + math.log(1 + n) + quad)


def _posterior(y: np.ndarray) -> tuple[float, float]:
    return y.sum() / (len(y) + 1), (len(y) + 1) ** -0.5


def test_numpyro_loss_is_minus_log_evidence_at_the_exact_posterior():
    def model(y):
        x = numpyro.sample("x", ndist.Normal(0.0, 1.0))
        with numpyro.plate("data", len(y)):
            numpyro.sample("y", ndist.Normal(x, 1.0), obs=y)

    loc, scale = _posterior(Y)
    guide = NAutoNormal(model, init_loc_fn=n_init_to_value(values={"x": loc}), init_scale=scale)
    y = jnp.asarray(Y)
    svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-3))
    state = svi.init(jax.random.PRNGKey(0), y)
    np.testing.assert_allclose(float(svi.evaluate(state, y)), -_evidence(Y), rtol=1e-4)
    _, loss = svi.update(state, y)  # the first update reports q_0's loss
    np.testing.assert_allclose(float(loss), -_evidence(Y), rtol=1e-4)
    assert float(svi.fisher_divergence(state, y)) < 1e-6


def test_pyro_loss_is_minus_log_evidence_at_the_exact_posterior():
    def model(y):
        x = pyro.sample("x", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", pdist.Normal(x, 1.0), obs=y)

    pyro.clear_param_store()
    loc, scale = _posterior(Y)
    guide = PAutoNormal(model, init_loc_fn=p_init_to_value(values={"x": torch.tensor(loc)}), init_scale=scale)
    y = torch.as_tensor(Y, dtype=torch.float32)
    svi = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-3}))
    np.testing.assert_allclose(svi.evaluate_loss(y), -_evidence(Y), rtol=1e-4)
    np.testing.assert_allclose(svi.step(y), -_evidence(Y), rtol=1e-4)
    pyro.clear_param_store()


N, B = 40, 10
Y_LOCAL = np.random.default_rng(1).normal(0.0, 1.5, size=N)
ROW_EVIDENCE = -0.5 * (np.log(2 * np.pi * 2.0) + Y_LOCAL**2 / 2.0)  # log N(y_i; 0, 2)


def _batch_mean_tolerance(num_evaluations: int) -> float:
    """4 standard errors of the mean of ``num_evaluations`` estimates ``N/B * sum`` over
    batches of ``B`` rows drawn without replacement (finite-population variance)."""
    variance = (N / B) ** 2 * B * ROW_EVIDENCE.var() * (N - B) / (N - 1)
    return 4 * math.sqrt(variance / num_evaluations)


@pytest.mark.slow  # 17-30 s on the 2-core CI machine: the default suite keeps its budget
def test_numpyro_loss_with_subsampled_local_latents_is_unbiased():
    def model(y, batch):
        with numpyro.plate("data", N, subsample_size=batch) as idx:
            z = numpyro.sample("z", ndist.Normal(0.0, 1.0))
            numpyro.sample("y", ndist.Normal(z, 1.0), obs=y[idx])

    y = jnp.asarray(Y_LOCAL)

    def engine_at_the_posterior(batch):  # the exact posterior N(y_i/2, 1/2)
        svi = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), numpyro.optim.Adam(1e-3))
        exact = {"z_auto_loc": y / 2, "z_auto_scale": jnp.full(N, 0.5**0.5)}
        return svi, svi.init(jax.random.PRNGKey(0), y, batch, init_params=exact)

    svi, full_state = engine_at_the_posterior(N)
    np.testing.assert_allclose(float(svi.evaluate(full_state, y, N)), -ROW_EVIDENCE.sum(), rtol=1e-4)
    svi, state = engine_at_the_posterior(B)
    keys = jax.random.split(jax.random.PRNGKey(1), 400)

    def at(key):  # fresh particles and a fresh epoch: a uniformly random batch
        return state._replace(rng_key=key, epoch_order=init_epoch_order({"data": (N, B)}, key))

    losses = jax.vmap(lambda key: svi.evaluate(at(key), y, B))(keys)
    assert abs(float(jnp.mean(losses)) + ROW_EVIDENCE.sum()) < _batch_mean_tolerance(400)
    assert float(jnp.std(losses)) > 0  # the batches differ


def test_pyro_loss_with_subsampled_local_latents_is_unbiased():
    def model(y, batch):
        with pyro.plate("data", N, subsample_size=batch) as idx:
            z = pyro.sample("z", pdist.Normal(0.0, 1.0))
            pyro.sample("y", pdist.Normal(z, 1.0), obs=y[idx])

    y = torch.as_tensor(Y_LOCAL, dtype=torch.float32)
    losses = {}
    for batch in (N, B):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        svi = pyro_psvi.ProximalScoreVI(model, PAutoNormal(model), pyro.optim.Adam({"lr": 1e-3}))
        svi.evaluate_loss(y, batch)  # sets the guide up; then the exact posterior N(y_i/2, 1/2)
        pyro.get_param_store()["AutoNormal.locs.z"] = y / 2
        pyro.get_param_store()["AutoNormal.scales.z"] = torch.full((N,), 0.5**0.5)
        losses[batch] = np.array([svi.evaluate_loss(y, batch) for _ in range(1 if batch == N else 400)])
    pyro.clear_param_store()
    np.testing.assert_allclose(losses[N][0], -ROW_EVIDENCE.sum(), rtol=1e-4)
    assert abs(losses[B].mean() + ROW_EVIDENCE.sum()) < _batch_mean_tolerance(400)
    assert losses[B].std() > 0
