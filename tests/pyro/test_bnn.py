"""A Bayesian MLP built from a plain ``torch.nn.Module`` trains on digits (Pyro)."""

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal, init_to_value
from torch import nn

from psvi.contrib.datasets import load_digits
from psvi.metrics import classification_report
from pyro_psvi import ProximalScoreVI
from pyro_psvi.contrib.models import FlatBayesianModule, bayesian_module, fan_in_prior, module_classifier


@pytest.mark.slow  # 30-57 s here; test_flat_module_fits_digits_and_explains_misuse runs by default
def test_nn_module_mlp_beats_prior_predictive_on_digits():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    data = load_digits()
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    x_test = torch.as_tensor(data.x_test)
    net = nn.Sequential(nn.Linear(64, 50), nn.Tanh(), nn.Linear(50, 10))
    init = {name: p.detach().clone() for name, p in net.named_parameters()}
    bayesian_module(net, prior=1.0)
    model = partial(module_classifier, net, subsample_size=64)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
    svi = ProximalScoreVI(
        model, guide, pyro.optim.Adam({"lr": 1e-3}), inner_steps=5, vectorize_particles=False
    )
    svi.run(1500, x, y)
    assert svi.num_rejected == 0

    def test_report(guide):
        predictive = Predictive(
            partial(module_classifier, net), guide=guide, num_samples=100, return_sites=["probs"]
        )
        return classification_report(predictive(x_test)["probs"].numpy(), data.y_test)

    posterior = test_report(guide)
    prior = test_report(None)
    # The prior predictive of N(0, 1) weights is close to uniform over 10 classes
    # (NLL near log 10 = 2.3); 6,000 score calls must bring it below a quarter of that.
    assert prior["nll"] > 2.0
    assert posterior["nll"] < 0.5 and posterior["accuracy"] > 0.9


class ResidualBlock(nn.Module):
    """A BatchNorm-free ResNet-style block: x + conv(relu(conv(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


def test_resnet_style_module_with_selected_priors():
    """Conv residual net on 8x8 digits. Priors on the conv weights only (the rest are
    model params, learned jointly): the fit runs without rejections. Priors on all of
    them: the test NLL falls from its initial value."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    data = load_digits()
    images = torch.as_tensor(data.x_train).reshape(-1, 1, 8, 8)
    labels = torch.as_tensor(data.y_train)

    def make_net():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), ResidualBlock(4), nn.Flatten(), nn.Linear(256, 10)
        )

    partial_net = bayesian_module(make_net(), prior=1.0, include=lambda name: "conv" in name)
    model = partial(module_classifier, partial_net, subsample_size=64)
    svi = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-3}), vectorize_particles=False)
    svi.evaluate_loss(images, labels)  # set-up: creates the guide's and the net's params
    linear = ["3.weight", "3.bias"]  # the Linear layer's plain parameters
    before = {k: pyro.param(k).detach().clone() for k in linear}
    svi.run(20, images, labels)
    assert svi.num_rejected == 0
    assert all(not torch.equal(pyro.param(k), before[k]) for k in linear)

    pyro.clear_param_store()
    net = make_net()
    init = {name: p.detach().clone() for name, p in net.named_parameters()}
    bayesian_module(net, prior=1.0)
    model = partial(module_classifier, net, subsample_size=64)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
    svi = ProximalScoreVI(
        model, guide, pyro.optim.Adam({"lr": 1e-3}), inner_steps=5, vectorize_particles=False
    )
    test_images = torch.as_tensor(data.x_test).reshape(-1, 1, 8, 8)

    def test_nll():
        predictive = Predictive(
            partial(module_classifier, net), guide=guide, num_samples=20, return_sites=["probs"]
        )
        return classification_report(predictive(test_images)["probs"].numpy(), data.y_test)["nll"]

    svi.evaluate_loss(images, labels)  # sets the guide up on the training data
    before = test_nll()
    svi.run(150, images, labels)
    assert svi.num_rejected == 0
    # 600 score calls from a random network (NLL ~ log 10 = 2.3): a clear drop.
    assert test_nll() < 0.75 * before


def test_flat_module_is_the_same_model_as_bayesian_module():
    """One flat site or one site per tensor: the same log joint at the same weights
    (priors from fan_in_prior included); the flat weights enter as views, not copies."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(192, 10))
    images, labels = torch.randn(7, 1, 8, 8), torch.randint(0, 10, (7,))
    flat = FlatBayesianModule(net, fan_in_prior(0.5))
    assert flat.num_weights == sum(p.numel() for p in net.parameters()) == 30 + 1930
    weights = flat.initial_weights + 0.1 * torch.randn(flat.num_weights)
    views = flat.unflatten(weights)
    assert views["3.weight"].shape == (10, 192)
    assert views["3.weight"].untyped_storage().data_ptr() == weights.untyped_storage().data_ptr()

    def log_joint(model, values):
        conditioned = pyro.poutine.condition(partial(module_classifier, model), data=values)
        return pyro.poutine.trace(conditioned).get_trace(images, labels).log_prob_sum()

    flat_log_joint = log_joint(flat, {"weights": weights})
    plain = bayesian_module(net, fan_in_prior(0.5))
    torch.testing.assert_close(flat_log_joint, log_joint(plain, views))


def test_flat_module_explains_misuse():
    net = FlatBayesianModule(nn.Sequential(nn.Linear(64, 50), nn.Tanh(), nn.Linear(50, 10)), prior=1.0)
    with pytest.raises(ValueError, match="vectorize_particles=False"):
        net.apply(torch.zeros(2, net.num_weights), torch.zeros(3, 64))
    with pytest.raises(ValueError, match="Normal priors.*bayesian_module"):
        FlatBayesianModule(nn.Linear(2, 2), prior=lambda name, p: dist.Laplace(torch.zeros_like(p), 1.0))


@pytest.mark.slow  # 40 s (the default suite's budget); the flat module's log joint is tested above
def test_flat_module_fits_digits():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    data = load_digits()
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    net = FlatBayesianModule(nn.Sequential(nn.Linear(64, 50), nn.Tanh(), nn.Linear(50, 10)), prior=1.0)
    model = partial(module_classifier, net, subsample_size=64)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"weights": net.initial_weights}),
                       init_scale=0.01)  # fmt: skip
    svi = ProximalScoreVI(
        model, guide, pyro.optim.Adam({"lr": 1e-3}), inner_steps=5, vectorize_particles=False
    )
    svi.run(600, x, y)
    assert svi.num_rejected == 0
    predictive = Predictive(
        partial(module_classifier, net), guide=guide, num_samples=50, return_sites=["probs"]
    )
    report = classification_report(predictive(torch.as_tensor(data.x_test))["probs"].numpy(), data.y_test)
    # 2,400 score calls from a random network (NLL ~ log 10 = 2.3); measured NLL 0.16.
    assert report["nll"] < 0.5 and report["accuracy"] > 0.9
