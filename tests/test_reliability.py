"""Reliability, both backends: rejection streaks, checkpoints, determinism, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as pdist
import pytest
import torch
from numpyro.infer.autoguide import AutoNormal as NAutoNormal
from pyro.infer.autoguide import AutoMultivariateNormal as PAutoMVN
from pyro.infer.autoguide import AutoNormal as PAutoNormal
from pyro.infer.autoguide import init_to_value as p_init_to_value

import numpyro_psvi
import pyro_psvi
from numpyro_psvi.models import linear_regression as n_linear_regression
from pyro_psvi.models import linear_regression as p_linear_regression


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(1)
    yield
    pyro.clear_param_store()


def data(n=60, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x, (x @ np.arange(1.0, dim + 1) + rng.normal(size=n)).astype(np.float32)


# --------------------------------------------------------------- rejection streaks
def test_numpyro_run_raises_after_consecutive_rejections():
    def model(broken):
        x = numpyro.sample("x", ndist.Normal(0.0, 1.0))
        numpyro.factor("bad", jnp.where(broken & (x > -10.0), jnp.nan, 0.0))

    guide = NAutoNormal(model)
    svi = numpyro_psvi.ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2),
                                       max_consecutive_rejections=5)
    state = svi.init(jax.random.PRNGKey(0), False)
    before = svi.get_params(state)
    with pytest.raises(RuntimeError, match="rejected the last 8 updates in a row"):
        svi.run(None, 8, True, progress_bar=False, init_state=state)
    state, _ = jax.jit(svi.update, static_argnums=1)(state, True)
    assert int(state.consecutive_rejected) == 1
    for name, value in svi.get_params(state).items():  # params and optimizer state kept
        np.testing.assert_array_equal(value, before[name])


def test_pyro_step_raises_after_consecutive_rejections_and_keeps_optimizer_state():
    def model():
        x = pyro.sample("x", pdist.Normal(0.0, 1.0))
        pyro.factor("bad", torch.where(x > 3.0, torch.nan, 0.0))

    guide = PAutoNormal(model, init_loc_fn=p_init_to_value(values={"x": torch.tensor(0.0)}),
                        init_scale=0.01)
    optim = pyro.optim.Adam({"lr": 1e-2})
    svi = pyro_psvi.ProximalScoreVI(model, guide, optim, vectorize_particles=False,
                                    max_consecutive_rejections=3)
    with pyro.validation_enabled(False):
        for _ in range(5):  # accepted steps: the optimizer has moments
            assert np.isfinite(svi.step())
        # Move the guide where the model is NaN: every step is rejected from here on.
        pyro.get_param_store().get_param("AutoNormal.locs.x").unconstrained().data.fill_(10.0)
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        moments = [{k: v.clone() for k, v in s.items()} for s in
                   (opt.state[p] for p, opt in optim.optim_objs.items())]
        with pytest.warns(RuntimeWarning, match="rejected 1 update"):
            svi.step()
            svi.step()
            with pytest.raises(RuntimeError, match="rejected the last 3 steps in a row"):
                svi.step()
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(value.detach(), params[name], rtol=0, atol=0)
    for before, (p, opt) in zip(moments, optim.optim_objs.items(), strict=True):
        for key, value in opt.state[p].items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)


# ------------------------------------------------------------ checkpoints, seeds
def test_numpyro_checkpoint_resume_is_bit_identical(tmp_path):
    x, y = map(jnp.asarray, data())
    model = lambda x, y: n_linear_regression(x, y, subsample_size=20)  # noqa: E731
    svi = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), numpyro.optim.Adam(1e-2))
    whole = svi.run(jax.random.PRNGKey(3), 40, x, y, progress_bar=False)
    half = svi.run(jax.random.PRNGKey(3), 20, x, y, progress_bar=False)
    numpyro_psvi.save_state(tmp_path / "state.pkl", half.state)
    resumed_engine = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), numpyro.optim.Adam(1e-2))
    resumed_engine.init(jax.random.PRNGKey(99), x, y)  # sets the engine up; state comes from disk
    state = numpyro_psvi.load_state(tmp_path / "state.pkl")
    resumed = resumed_engine.run(None, 20, x, y, progress_bar=False, init_state=state)
    for name in whole.params:
        np.testing.assert_array_equal(whole.params[name], resumed.params[name])
    assert int(resumed.state.num_score_calls) == int(whole.state.num_score_calls) == 160
    # Same seed, same result; another seed, another.
    again = svi.run(jax.random.PRNGKey(3), 40, x, y, progress_bar=False)
    other = svi.run(jax.random.PRNGKey(4), 40, x, y, progress_bar=False)
    np.testing.assert_array_equal(whole.params["w_auto_loc"], again.params["w_auto_loc"])
    assert not np.array_equal(whole.params["w_auto_loc"], other.params["w_auto_loc"])


@pytest.mark.parametrize("engine", ["psvi", "gsm"])
def test_pyro_checkpoint_resume_is_bit_identical(tmp_path, engine):
    x, y = map(torch.as_tensor, data())

    def model(x, y):
        p_linear_regression(x, y, subsample_size=20)

    def fit(num_steps, load=None, save=None):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = PAutoMVN(model)
        if engine == "psvi":
            svi = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
        else:
            svi = pyro_psvi.GSM(model, guide, num_particles=4)
        if load:
            svi.load(load)
        for _ in range(num_steps):
            svi.step(x, y)
        if save:
            svi.save(save)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}, svi

    whole, _ = fit(40)
    fit(20, save=tmp_path / "ckpt.pt")
    resumed, svi = fit(20, load=tmp_path / "ckpt.pt")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)
    assert svi.num_score_calls == 40 * svi.num_particles
    again, _ = fit(40)  # same seed, same result
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], rtol=0, atol=0)


# -------------------------------------------------------------------- bad input
def test_guide_built_for_another_model_is_refused():
    def model_a():
        numpyro.sample("a", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))

    def model_b():
        numpyro.sample("b", ndist.Normal(0.0, 1.0))

    svi = numpyro_psvi.ProximalScoreVI(model_a, NAutoNormal(model_b), numpyro.optim.Adam(1e-2))
    with pytest.raises(ValueError, match="built for another model.*'a'.*'b'"):
        svi.init(jax.random.PRNGKey(0))

    def pmodel_a():
        pyro.sample("a", pdist.Normal(torch.zeros(2), 1.0).to_event(1))

    def pmodel_b():
        pyro.sample("b", pdist.Normal(0.0, 1.0))

    psvi = pyro_psvi.ProximalScoreVI(pmodel_a, PAutoNormal(pmodel_b), pyro.optim.Adam({"lr": 1e-2}))
    with pytest.raises(ValueError, match="built for another model.*'a'.*'b'"):
        psvi.step()


def test_subsample_larger_than_plate_is_refused():
    def model():
        mu = numpyro.sample("mu", ndist.Normal(0.0, 1.0))
        with numpyro.plate("data", 10, subsample_size=20):
            numpyro.sample("y", ndist.Normal(mu, 1.0), obs=jnp.zeros(10))

    svi = numpyro_psvi.ProximalScoreVI(model, NAutoNormal(model), numpyro.optim.Adam(1e-2))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="subsample_size=20 larger than"):
        svi.init(jax.random.PRNGKey(0))

    def pmodel():
        mu = pyro.sample("mu", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", 10, subsample_size=20):
            pyro.sample("y", pdist.Normal(mu, 1.0), obs=torch.zeros(10))

    psvi = pyro_psvi.ProximalScoreVI(pmodel, PAutoNormal(pmodel), pyro.optim.Adam({"lr": 1e-2}))
    with pytest.raises(ValueError, match="subsample_size"):
        psvi.step()


def test_arguments_that_change_the_latents_are_refused():
    x, y = data(dim=3)
    x5, _ = data(dim=5)
    svi = numpyro_psvi.ProximalScoreVI(n_linear_regression, NAutoNormal(n_linear_regression),
                                       numpyro.optim.Adam(1e-2))
    state = svi.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(y))
    with pytest.raises(ValueError, match=r"differ from those at init \('w': \(3,\) vs \(5,\)\)"):
        svi.update(state, jnp.asarray(x5), jnp.asarray(y))
    svi.update(state, jnp.asarray(x[:30]), jnp.asarray(y[:30]))  # fewer rows: same latents

    psvi = pyro_psvi.ProximalScoreVI(p_linear_regression, PAutoNormal(p_linear_regression),
                                     pyro.optim.Adam({"lr": 1e-2}))
    psvi.step(torch.as_tensor(x), torch.as_tensor(y))
    psvi.step(torch.as_tensor(x[:30]), torch.as_tensor(y[:30]))
    with pytest.raises(ValueError, match=r"differ from those of the first step \('w': \(3,\) vs \(5,\)\)"):
        psvi.step(torch.as_tensor(x5), torch.as_tensor(y))


def test_data_on_another_device_is_refused():
    x, y = map(torch.as_tensor, data())
    psvi = pyro_psvi.ProximalScoreVI(p_linear_regression, PAutoNormal(p_linear_regression),
                                     pyro.optim.Adam({"lr": 1e-2}))
    with pytest.raises(ValueError, match=r"different devices \(\(60, 3\) on cpu, \(60,\) on meta"):
        psvi.step(x, y.to("meta"))
