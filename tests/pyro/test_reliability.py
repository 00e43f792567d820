"""Reliability (Pyro): rejection streaks, checkpoints, determinism."""

import warnings

import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import torch
from psvi_testing.regression import regression_data
from pyro.infer.autoguide import AutoMultivariateNormal as PAutoMVN
from pyro.infer.autoguide import AutoNormal as PAutoNormal
from pyro.infer.autoguide import init_to_value as p_init_to_value

import pyro_psvi
from pyro_psvi.contrib.models import linear_regression as p_linear_regression

pytestmark = pytest.mark.usefixtures("fresh_pyro")


def test_pyro_step_raises_after_consecutive_rejections_and_keeps_optimizer_state():
    def model():
        x = pyro.sample("x", pdist.Normal(0.0, 1.0))
        pyro.factor("bad", torch.where(x > 3.0, torch.nan, 0.0))

    guide = PAutoNormal(model, init_loc_fn=p_init_to_value(values={"x": torch.tensor(0.0)}), init_scale=0.01)
    optim = pyro.optim.Adam({"lr": 1e-2})
    svi = pyro_psvi.ProximalScoreVI(
        model, guide, optim, vectorize_particles=False, max_consecutive_rejections=3
    )
    with pyro.validation_enabled(False):
        for _ in range(5):  # accepted steps: the optimizer has moments
            assert np.isfinite(svi.step())
        # Move the guide where the model is NaN: every step is rejected from here on.
        pyro.get_param_store().get_param("AutoNormal.locs.x").unconstrained().data.fill_(10.0)
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        moments = [
            {k: v.clone() for k, v in s.items()}
            for s in (opt.state[p] for p, opt in optim.optim_objs.items())
        ]
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


def test_pyro_lowrank_guide_past_floats_range_is_rejected_not_raised():
    # A low-rank guide whose cov factor overflows float32 (1e30: its Gram matrix is inf):
    # the Cholesky factor of its capacitance, the particles' SVD, F's Gram eigenpairs and
    # the Procrustes SVD all meet non-finite input, on which torch raises (NumPyro gives
    # NaN). The update is rejected and the params kept, as in NumPyro, not a LinAlgError
    # from inside the step.
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    def model():
        pyro.sample("x", pdist.Normal(torch.zeros(4), 1.0).to_event(1))

    guide = AutoLowRankMultivariateNormal(model)
    svi = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    svi.step()
    factor = pyro.get_param_store().get_param("AutoLowRankMultivariateNormal.cov_factor")
    factor.unconstrained().data.fill_(1e30)
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.warns(RuntimeWarning, match="rejected 1 update"):
        assert np.isnan(svi.step())
    assert svi.num_rejected == 1
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(value.detach(), params[name], rtol=0, atol=0)


def test_pyro_run_warns_when_its_loss_rose():
    # run() reads its losses (psvi.checks.rising_loss_message, tested in tests/core): an
    # engine whose -ELBO estimates rise 1, 2, ..., 100 is warned about; the real engine's
    # falling ones are not.
    def model():
        pyro.sample("x", pdist.Normal(0.0, 1.0))

    class Rising(pyro_psvi.ProximalScoreVI):
        def update(self, *args, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            return torch.tensor(float(self.calls))

    optim = pyro.optim.Adam({"lr": 1e-2})
    with pytest.warns(RuntimeWarning, match="-ELBO estimate rose during this run"):
        Rising(model, PAutoNormal(model), optim).run(100)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*estimate rose")
        pyro_psvi.ProximalScoreVI(model, PAutoNormal(model), optim).run(100)


@pytest.mark.parametrize("engine", ["psvi", "gsm"])
def test_pyro_checkpoint_resume_is_bit_identical(tmp_path, engine):
    x, y = map(torch.as_tensor, regression_data())

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


def test_guide_built_for_another_model_is_refused():
    def model_a():
        pyro.sample("a", pdist.Normal(torch.zeros(2), 1.0).to_event(1))

    def model_b():
        pyro.sample("b", pdist.Normal(0.0, 1.0))

    svi = pyro_psvi.ProximalScoreVI(model_a, PAutoNormal(model_b), pyro.optim.Adam({"lr": 1e-2}))
    with pytest.raises(ValueError, match="built for another model.*'a'.*'b'"):
        svi.step()


def test_subsample_larger_than_plate_is_refused():
    def model():
        mu = pyro.sample("mu", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", 10, subsample_size=20):
            pyro.sample("y", pdist.Normal(mu, 1.0), obs=torch.zeros(10))

    svi = pyro_psvi.ProximalScoreVI(model, PAutoNormal(model), pyro.optim.Adam({"lr": 1e-2}))
    with pytest.raises(ValueError, match="subsample_size"):
        svi.step()


def test_arguments_that_change_the_latents_are_refused():
    x, y = map(torch.as_tensor, regression_data(dim=3))
    x5, _ = map(torch.as_tensor, regression_data(dim=5))
    svi = pyro_psvi.ProximalScoreVI(
        p_linear_regression, PAutoNormal(p_linear_regression), pyro.optim.Adam({"lr": 1e-2})
    )
    svi.step(x, y)
    svi.step(x[:30], y[:30])  # fewer rows: same latents
    with pytest.raises(ValueError, match=r"differ from those of the first step \('w': \(3,\) vs \(5,\)\)"):
        svi.step(x5, y)


def test_data_on_another_device_is_refused():
    x, y = map(torch.as_tensor, regression_data())
    svi = pyro_psvi.ProximalScoreVI(
        p_linear_regression, PAutoNormal(p_linear_regression), pyro.optim.Adam({"lr": 1e-2})
    )
    with pytest.raises(ValueError, match=r"different devices \(\(60, 3\) on cpu, \(60,\) on meta"):
        svi.step(x, y.to("meta"))
