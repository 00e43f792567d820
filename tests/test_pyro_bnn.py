"""A Bayesian MLP built from a plain ``torch.nn.Module`` trains on digits (Pyro)."""

from functools import partial

import pyro
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal, init_to_value
from torch import nn

from psvi.datasets import load_digits
from psvi.metrics import classification_report
from pyro_psvi import ProximalScoreVI, bayesian_module
from pyro_psvi.models import module_classifier


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
