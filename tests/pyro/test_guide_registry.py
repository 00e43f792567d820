"""The guide registry (Pyro): what each family declares and clear refusals."""

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import affine_coupling, block_autoregressive, iterated
from pyro.infer import autoguide as ag
from pyro.infer.autoguide.gaussian import AutoGaussianFunsor

from pyro_psvi import GSM, ProximalScoreVI, guide_family


def model():
    pyro.sample("x", dist.Normal(torch.zeros(4), 1.0).to_event(1))


def two_site_model():
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(x, 1.0))


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize(
    ("guide_cls", "local_latents", "full_covariance"),
    [
        (ag.AutoNormal, True, False),
        (ag.AutoDiagonalNormal, False, False),
        (ag.AutoMultivariateNormal, False, True),
        (ag.AutoLowRankMultivariateNormal, False, False),
        (ag.AutoIAFNormal, False, False),
    ],
)
def test_families_declare_what_the_engines_ask(guide_cls, local_latents, full_covariance):
    family = guide_family(guide_cls(model))
    assert family.refusal is None and family.name == guide_cls.__name__
    assert (family.local_latents, family.full_covariance) == (local_latents, full_covariance)


def test_flow_advice_depends_on_the_layers():
    """An autoregressive flow inverts in D sequential passes (a warning above 32
    dimensions); a coupling flow in one (no warning)."""
    iaf = ag.AutoIAFNormal(model)
    coupling = ag.AutoNormalizingFlow(model, partial(iterated, 2, affine_coupling))
    iaf(), coupling()
    assert "Inverse autoregressive flow guide with D=64" in guide_family(iaf).advice(64, 4)
    assert guide_family(coupling).advice(64, 4) is None


def test_full_covariance_advice_depends_on_the_particles():
    """A full covariance with D > 16 S particles diverged at lr 1e-2 (docs/gaussian_targets.md)."""
    advice = guide_family(ag.AutoMultivariateNormal(model)).advice
    assert "Full-covariance guide with D=100 latent dimensions" in advice(100, 4)
    assert advice(64, 4) is None


def test_lowrank_advice_depends_on_the_dimension_and_the_particles():
    """A low-rank guide with D > min(100, 10 S) stalled or diverged with exact scores
    (docs/lowrank_study.md)."""
    advice = guide_family(ag.AutoLowRankMultivariateNormal(model)).advice
    assert "AutoLowRankMultivariateNormal with D=90" in advice(90, 8)
    assert "D=1000 with S=8 and S=125" in advice(1000, 125)
    assert advice(90, 9) is None and advice(100, 10) is None


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ag.AutoDelta(model), "AutoDelta: it is a point mass"),
        (lambda: ag.AutoLaplaceApproximation(model), "AutoLaplaceApproximation: it is a point mass"),
        (lambda: ag.AutoStructured(model, conditionals="delta"), "AutoStructured: its conditionals must be"),
        (
            lambda: ag.AutoStructured(model, dependencies={"x": {}}, conditionals={"x": lambda: None}),
            "a callable one has no density",
        ),
        (
            lambda: ag.AutoStructured(
                two_site_model,
                conditionals={"x": "normal", "y": "normal"},
                dependencies={"y": {"x": lambda aux: aux}},
            ),
            "dependencies must be 'linear'",
        ),  # fmt: skip
        (
            lambda: ag.AutoNormalizingFlow(model, partial(iterated, 2, block_autoregressive)),
            "block-autoregressive flow has no inverse",
        ),
        (lambda: 42, "must be an autoguide or a function, got int"),
    ],
)
def test_refused_guides_name_the_reason(make, match):
    with pytest.raises(TypeError, match=match):
        ProximalScoreVI(model, make(), pyro.optim.Adam({"lr": 1e-2}))


def test_autostructured_with_normal_or_mvn_conditionals_and_linear_dependencies_is_fitted():
    assert guide_family(ag.AutoStructured(model)).refusal is None
    guide = ag.AutoStructured(
        two_site_model, conditionals={"x": "normal", "y": "mvn"}, dependencies={"y": {"x": "linear"}}
    )
    assert guide_family(guide).refusal is None


def test_autogaussian_is_fitted_with_the_dense_backend_and_refused_with_funsors():
    """``AutoGaussian(model)`` builds ``AutoGaussianDense``, which has a density; the funsor
    backend's guide (checked on its class: funsor is not a test dependency) is refused
    with the fix."""
    assert guide_family(ag.AutoGaussian(model)).refusal is None
    funsor_guide = object.__new__(AutoGaussianFunsor)
    with pytest.raises(TypeError, match="backend='dense'"):
        guide_family(funsor_guide).check_supported()


def test_a_subclass_inherits_its_family():
    class MyNormal(ag.AutoNormal):
        pass

    assert guide_family(MyNormal(model)).local_latents


def test_baselines_refuse_a_family_that_is_not_one_full_covariance():
    with pytest.raises(TypeError, match="GSM fits a full-covariance Gaussian"):
        GSM(model, ag.AutoNormal(model))
