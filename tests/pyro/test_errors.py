"""Clear errors for what ProximalScoreVI cannot fit (Pyro)."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLaplaceApproximation,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_psvi import ProximalScoreVI


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def gaussian_model():
    pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def adam():
    return pyro.optim.Adam({"lr": 1e-2})


@pytest.mark.parametrize("guide_cls", [AutoDelta, AutoLaplaceApproximation])
def test_point_mass_guides_are_refused(guide_cls):
    with pytest.raises(TypeError, match="point mass.*instead"):
        ProximalScoreVI(gaussian_model, guide_cls(gaussian_model), adam())


def test_guide_that_is_neither_autoguide_nor_function_is_refused():
    with pytest.raises(TypeError, match="must be an autoguide or a function, got dict"):
        ProximalScoreVI(gaussian_model, {"x": 1.0}, adam())


def test_discrete_latent_is_refused():
    def model():
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.3))
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    svi = ProximalScoreVI(model, AutoNormal(model), adam())
    with pytest.raises(ValueError, match="'z' is discrete.*not marked for enumeration.*config_enumerate"):
        svi.step()


def test_latent_whose_density_is_nan_inside_its_declared_support_is_refused():
    """torch's biject_to(positive) ends in an AffineTransform (codomain real), so a
    TransformedDistribution through it declares the support real; its autoguide would draw
    negative values, whose log density is NaN (Pyro's validation raised inside the model)."""
    from torch.distributions import biject_to

    def model():
        pyro.sample(
            "x", dist.TransformedDistribution(dist.Normal(0.0, 1.0), [biject_to(dist.constraints.positive)])
        )

    svi = ProximalScoreVI(model, AutoNormal(model), adam())
    with pytest.raises(
        ValueError, match=r"'x'.*NaN at values inside its declared support.*transform whose codomain"
    ):
        svi.step()


def test_model_param_is_refused_by_the_baselines():
    from pyro_psvi import GSM

    def model():
        loc = pyro.param("loc", torch.zeros(()))
        pyro.sample("x", dist.Normal(loc, 1.0))

    engine = GSM(model, AutoMultivariateNormal(model))
    with pytest.raises(NotImplementedError, match=r"learnable params \['loc'\].*ProximalScoreVI"):
        engine.step()


@pytest.mark.parametrize("guide_class", [AutoDiagonalNormal, AutoMultivariateNormal])
def test_local_latent_in_subsampled_plate_needs_auto_normal(guide_class):
    def model():
        with pyro.plate("data", 100, subsample_size=10):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    svi = ProximalScoreVI(model, guide_class(model), adam())
    with pytest.raises(
        NotImplementedError, match="'z' is local to the subsampled plate 'data'.*Use AutoNormal"
    ):
        svi.step()


def test_dependent_support_is_refused():
    def model():
        s = pyro.sample("s", dist.Exponential(1.0))
        pyro.sample("x", dist.Uniform(-s, s))

    svi = ProximalScoreVI(model, AutoMultivariateNormal(model), adam())
    with pytest.raises(NotImplementedError, match="'x' has a support that depends.*Reparameterize"):
        svi.step()


def test_no_latent_and_bad_data_are_refused():
    def observed_only():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="no latent sample sites"):
        ProximalScoreVI(observed_only, AutoNormal(observed_only), adam()).step()

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ValueError, match="'y' holds non-finite values"):
        ProximalScoreVI(model, AutoNormal(model), adam()).step(torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_particles": 0}, "num_particles"),
        ({"inner_steps": 0}, "inner_steps"),
        ({"prox_weight": -1.0}, "prox_weight"),
        ({"weighting": "fisher"}, "weighting"),
        ({"trust_region": 0.0}, "trust_region"),
    ],
)
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ProximalScoreVI(gaussian_model, AutoNormal(gaussian_model), adam(), **kwargs)


def test_full_covariance_with_few_particles_warns():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(80), 1.0).to_event(1))

    # The advice measured the optimizer's inner steps; the closed-form step (the default
    # here) fitted D = 100 and 200 with S = 4 to KL < 1e-8 (docs/gaussian_targets.md).
    svi = ProximalScoreVI(model, AutoMultivariateNormal(model), adam(), num_particles=4, inner_steps=20)
    with pytest.warns(UserWarning, match="num_particles >= 10"):
        svi.step()
    pyro.clear_param_store()
    closed_form = ProximalScoreVI(model, AutoMultivariateNormal(model), adam(), num_particles=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        closed_form.step()
    assert closed_form.inner_solver == "closed_form"


def test_the_objective_is_a_record_and_an_elbo_is_refused():
    from pyro.infer import Trace_ELBO

    from pyro_psvi import ProximalScoreMatching

    guide = AutoNormal(gaussian_model)
    svi = ProximalScoreVI(gaussian_model, guide, adam(), ProximalScoreMatching(prox_weight=3.0))
    assert svi.objective == ProximalScoreMatching(3.0, "covariance", 256)
    assert (
        ProximalScoreVI(gaussian_model, guide, adam(), weighting="identity").objective.weighting == "identity"
    )
    with pytest.raises(TypeError, match=r"not Trace_ELBO: drop the loss argument, or"):
        ProximalScoreVI(gaussian_model, guide, adam(), Trace_ELBO())
    # Its particle settings are not silently lost: the error names them.
    with pytest.raises(TypeError, match=r"loss argument and pass num_particles=10 to ProximalScoreVI"):
        ProximalScoreVI(gaussian_model, guide, adam(), loss=Trace_ELBO(num_particles=10))
