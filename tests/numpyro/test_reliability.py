"""Reliability (NumPyro): rejection streaks, checkpoints, determinism."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pytest
from numpyro.infer.autoguide import AutoNormal as NAutoNormal
from psvi_testing.regression import regression_data

import numpyro_psvi
from numpyro_psvi.contrib.models import linear_regression as n_linear_regression


# --------------------------------------------------------------- rejection streaks
def test_numpyro_run_raises_after_consecutive_rejections():
    def model(broken):
        x = numpyro.sample("x", ndist.Normal(0.0, 1.0))
        numpyro.factor("bad", jnp.where(broken & (x > -10.0), jnp.nan, 0.0))

    guide = NAutoNormal(model)
    svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2), max_consecutive_rejections=5)
    state = svi.init(jax.random.PRNGKey(0), False)
    before = svi.get_params(state)
    with pytest.raises(RuntimeError, match="rejected the last 8 updates in a row"):
        svi.run(None, 8, True, progress_bar=False, init_state=state)
    state, _ = jax.jit(svi.update, static_argnums=1)(state, True)
    assert int(state.consecutive_rejected) == 1
    for name, value in svi.get_params(state).items():  # params and optimizer state kept
        np.testing.assert_array_equal(value, before[name])


def test_numpyro_lowrank_guide_on_centered_eight_schools_stays_finite():
    # The low-rank closed-form step on the centered eight schools (float32, defaults): the
    # factor-analysis projection drifted into a Heywood case, s_i shrinking and the factor
    # rows F_i growing with Lam_i = s_i F_i fixed (|F_i|^2 past 3,000 by update 400, 1e5 by
    # 600), until update 676 and every one after it was rejected (F not finite). The floor
    # Psi_ii >= LOWRANK_DIAG_FLOOR C_ii bounds |F_i|^2 by 1 / LOWRANK_DIAG_FLOOR (float32
    # round-off: 1e-4 relative).
    from numpyro.infer.autoguide import AutoLowRankMultivariateNormal

    from psvi.objective import LOWRANK_DIAG_FLOOR

    def model(y):
        mu = numpyro.sample("mu", ndist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", ndist.HalfCauchy(5.0))
        with numpyro.plate("J", 8):
            theta = numpyro.sample("theta", ndist.Normal(mu, tau))
            numpyro.sample("y", ndist.Normal(theta, jnp.array([15.0, 10, 16, 11, 9, 11, 10, 18])), obs=y)

    y = jnp.array([28.0, 8, -3, 7, -1, 1, 18, 12])
    svi = numpyro_psvi.ProximalScoreVI(model, AutoLowRankMultivariateNormal(model), numpyro.optim.Adam(1e-2))
    result = svi.run(jax.random.PRNGKey(0), 400, y, progress_bar=False)
    rows = np.sum(np.asarray(result.params["auto_cov_factor"]) ** 2, 1)
    assert int(result.state.num_rejected) == 0
    assert np.all(np.isfinite(rows)) and rows.max() <= (1 + 1e-4) / LOWRANK_DIAG_FLOOR


def test_numpyro_run_warns_when_its_loss_rose():
    # As the Pyro twin: run() reads its losses (psvi.checks.rising_loss_message).
    def model():
        numpyro.sample("x", ndist.Normal(0.0, 1.0))

    class Rising(numpyro_psvi.ProximalScoreVI):
        def update(self, state, *args, **kwargs):
            state = state._replace(num_score_calls=state.num_score_calls + 1)
            return state, state.num_score_calls.astype(jnp.float32)

    optim = numpyro.optim.Adam(1e-2)
    with pytest.warns(RuntimeWarning, match="-ELBO estimate rose during this run"):
        Rising(model, NAutoNormal(model), optim).run(jax.random.PRNGKey(0), 100, progress_bar=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*estimate rose")
        numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), optim).run(
            jax.random.PRNGKey(0), 100, progress_bar=False
        )


# ------------------------------------------------------------ checkpoints, seeds
@pytest.mark.slow  # 13-25 s on the 2-core CI machine, a Pyro twin or sibling in the default suite
def test_numpyro_checkpoint_resume_is_bit_identical(tmp_path):
    x, y = map(jnp.asarray, regression_data())
    model = lambda x, y: n_linear_regression(x, y, subsample_size=20)  # noqa: E731
    svi = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), numpyro.optim.Adam(1e-2))
    whole = svi.run(jax.random.PRNGKey(3), 40, x, y, progress_bar=False)
    half = svi.run(jax.random.PRNGKey(3), 20, x, y, progress_bar=False)
    svi.save(tmp_path / "state", half.state)
    resumed_engine = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), numpyro.optim.Adam(1e-2))
    state = resumed_engine.load(tmp_path / "state", x, y)  # sets the engine up, checks, reads
    resumed = resumed_engine.run(None, 20, x, y, progress_bar=False, init_state=state)
    for name in whole.params:
        np.testing.assert_array_equal(whole.params[name], resumed.params[name])
    assert int(resumed.state.num_score_calls) == int(whole.state.num_score_calls) == 160
    # Same seed, same result; another seed, another.
    again = svi.run(jax.random.PRNGKey(3), 40, x, y, progress_bar=False)
    other = svi.run(jax.random.PRNGKey(4), 40, x, y, progress_bar=False)
    np.testing.assert_array_equal(whole.params["w_auto_loc"], again.params["w_auto_loc"])
    assert not np.array_equal(whole.params["w_auto_loc"], other.params["w_auto_loc"])


def test_guide_built_for_another_model_is_refused():
    def model_a():
        numpyro.sample("a", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))

    def model_b():
        numpyro.sample("b", ndist.Normal(0.0, 1.0))

    svi = numpyro_psvi.ProximalScoreVI(model_a, NAutoNormal(model_b), numpyro.optim.Adam(1e-2))
    with pytest.raises(ValueError, match="built for another model.*'a'.*'b'"):
        svi.init(jax.random.PRNGKey(0))


def test_subsample_larger_than_plate_is_refused():
    def model():
        mu = numpyro.sample("mu", ndist.Normal(0.0, 1.0))
        with numpyro.plate("data", 10, subsample_size=20):
            numpyro.sample("y", ndist.Normal(mu, 1.0), obs=jnp.zeros(10))

    svi = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), numpyro.optim.Adam(1e-2))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="subsample_size=20 larger than"):
        svi.init(jax.random.PRNGKey(0))


def test_arguments_that_change_the_latents_are_refused():
    x, y = regression_data(dim=3)
    x5, _ = regression_data(dim=5)
    svi = numpyro_psvi.ProximalScoreVI(
        n_linear_regression, NAutoNormal(n_linear_regression), numpyro.optim.Adam(1e-2)
    )
    state = svi.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(y))
    with pytest.raises(ValueError, match=r"differ from those at init \('w': \(3,\) vs \(5,\)\)"):
        svi.update(state, jnp.asarray(x5), jnp.asarray(y))
    svi.update(state, jnp.asarray(x[:30]), jnp.asarray(y[:30]))  # fewer rows: same latents
