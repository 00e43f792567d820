"""GSM and BaM (Pyro): closed-form updates against exact Gaussian posteriors."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_value

from psvi.contrib.targets import ill_conditioned_gaussian
from psvi.metrics import gaussian_kl
from pyro_psvi import GSM, BaM, bam_schedule
from pyro_psvi.contrib.models import gaussian_target

pytestmark = pytest.mark.usefixtures("fresh_pyro")


def fit_kl(engine_cls, dim, calls, **options):
    mean, cov = ill_conditioned_gaussian(dim, 1e4, seed=1)
    model = gaussian_target(mean, cov)
    guide = AutoMultivariateNormal(
        model, init_loc_fn=init_to_value(values={"x": torch.zeros(dim)}), init_scale=1.0
    )
    engine = engine_cls(model, guide, **options)
    losses = engine.run(calls // engine.num_particles)
    posterior = guide.get_posterior()
    kl = gaussian_kl(
        mean, cov, posterior.loc.detach().double().numpy(),
        posterior.covariance_matrix.detach().double().numpy(),
    )  # fmt: skip
    return kl, engine, losses


def test_gsm_converges_on_ill_conditioned_gaussian():
    """docs/pitfalls.md measured the reference gsmvi at KL < 0.01 after 86 calls (D=10, B=2)."""
    kl, engine, _ = fit_kl(GSM, 10, 400, num_particles=2)
    assert kl < 0.01
    assert engine.num_score_calls == 400


@pytest.mark.parametrize("kind", ["constant", "bd"])
def test_bam_converges_on_ill_conditioned_gaussian(kind):
    schedule = bam_schedule(kind, 1.0, batch=8, dim=10)
    kl, engine, _ = fit_kl(BaM, 10, 1600, num_particles=8, learning_rate=schedule)
    assert kl < 0.01 and engine.num_rejected == 0


def test_non_finite_update_is_rejected():
    def model():
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("bad", torch.where(x[..., 0] > 3.0, torch.nan, 0.0))

    guide = AutoMultivariateNormal(
        model, init_loc_fn=init_to_value(values={"x": torch.tensor([3.0, 0.0])}), init_scale=1.0
    )
    engine = GSM(model, guide, num_particles=8, vectorize_particles=False)
    with pyro.validation_enabled(False):
        engine.evaluate_loss()
        before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        with pytest.warns(RuntimeWarning, match="GSM rejected 1 update"):
            loss = engine.step()
    assert engine.num_rejected == 1 and not np.isfinite(loss)
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(value.detach(), before[name], rtol=0, atol=0)


def test_other_guides_and_bad_options_are_refused():
    model = gaussian_target(np.zeros(2), np.eye(2))
    with pytest.raises(TypeError, match="AutoMultivariateNormal"):
        GSM(model, AutoNormal(model))
    with pytest.raises(ValueError, match="num_particles >= 2"):
        BaM(model, AutoMultivariateNormal(model), num_particles=1)
    with pytest.raises(ValueError, match="kind must be one of"):
        bam_schedule("cosine")
