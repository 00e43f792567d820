"""GSM and BaM (NumPyro): closed-form updates against exact Gaussian posteriors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_value

from numpyro_psvi import bam_schedule
from numpyro_psvi.baselines import GSM, BaM, bam_step
from numpyro_psvi.contrib.models import gaussian_target
from psvi.contrib.targets import ill_conditioned_gaussian
from psvi.metrics import gaussian_kl


def fit_kl(engine_cls, dim, calls, **options):
    mean, cov = ill_conditioned_gaussian(dim, 1e4, seed=1)
    model = gaussian_target(mean, cov)
    guide = AutoMultivariateNormal(
        model, init_loc_fn=init_to_value(values={"x": jnp.zeros(dim)}), init_scale=1.0
    )
    engine = engine_cls(model, guide, **options)
    result = engine.run(jax.random.PRNGKey(0), calls // engine.num_particles)
    tril = np.asarray(result.params["auto_scale_tril"], np.float64)
    kl = gaussian_kl(mean, cov, np.asarray(result.params["auto_loc"], np.float64), tril @ tril.T)
    return kl, result


def test_gsm_converges_on_ill_conditioned_gaussian():
    """docs/pitfalls.md measured the reference gsmvi at KL < 0.01 after 86 calls (D=10, B=2)."""
    kl, result = fit_kl(GSM, 10, 400, num_particles=2)
    assert kl < 0.01
    assert int(result.state.num_score_calls) == 400


@pytest.mark.parametrize("kind", ["constant", "bd"])
def test_bam_converges_on_ill_conditioned_gaussian(kind):
    schedule = bam_schedule(kind, 1.0, batch=8, dim=10)
    kl, result = fit_kl(BaM, 10, 1600, num_particles=8, learning_rate=schedule)
    assert kl < 0.01 and int(result.state.num_rejected) == 0


def test_bam_solves_its_quadratic_matrix_equation():
    """The update's covariance S satisfies S U S + S = V (docs/baselines.md)."""
    rng = np.random.default_rng(0)
    d, b, lr = 5, 6, 0.7
    loc = rng.normal(size=d)
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + np.eye(d)
    u, g = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    new_loc, new_cov = bam_step(*(jnp.asarray(v) for v in (loc, cov, u, g)), lr)
    zbar, gbar = u.mean(0), g.mean(0)
    c = (u - zbar).T @ (u - zbar) / b
    gam = (g - gbar).T @ (g - gbar) / b
    big_u = lr * gam + lr / (1 + lr) * np.outer(gbar, gbar)
    big_v = cov + lr * c + lr / (1 + lr) * np.outer(loc - zbar, loc - zbar)
    s = np.asarray(new_cov, np.float64)
    np.testing.assert_allclose(s @ big_u @ s + s, big_v, rtol=1e-3, atol=1e-4)
    expected_loc = loc / (1 + lr) + lr / (1 + lr) * (s @ gbar + zbar)
    np.testing.assert_allclose(np.asarray(new_loc), expected_loc, rtol=1e-3, atol=1e-4)


def test_non_positive_definite_update_is_rejected():
    """Non-finite scores: the update is rejected, the params kept, the rejection counted."""

    def model():
        x = numpyro.sample("x", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
        numpyro.factor("bad", jnp.where(x[0] > 3.0, jnp.nan, 0.0))

    guide = AutoMultivariateNormal(
        model, init_loc_fn=init_to_value(values={"x": jnp.array([3.0, 0.0])}), init_scale=1.0
    )
    engine = GSM(model, guide, num_particles=8)
    state = engine.init(jax.random.PRNGKey(0))
    new_state, loss = jax.jit(engine.update)(state)
    assert int(new_state.num_rejected) == 1 and not np.isfinite(float(loss))
    before, after = engine.get_params(state), engine.get_params(new_state)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_other_guides_and_bad_options_are_refused():
    model = gaussian_target(np.zeros(2), np.eye(2))
    with pytest.raises(TypeError, match="AutoMultivariateNormal"):
        GSM(model, AutoNormal(model))
    with pytest.raises(ValueError, match="num_particles >= 2"):
        BaM(model, AutoMultivariateNormal(model), num_particles=1)
    with pytest.raises(ValueError, match="kind must be one of"):
        bam_schedule("cosine")
