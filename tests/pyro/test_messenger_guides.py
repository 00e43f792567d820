"""Pyro's messenger autoguides (``AutoNormalMessenger`` and its siblings) are fitted as
user-written guides: each reaches a posterior that lies in its family."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import autoguide as ag

from pyro_psvi import ProximalScoreVI

pytestmark = pytest.mark.usefixtures("fresh_pyro")

Y = torch.tensor([1.5, -0.5, 3.0])
NUM_DRAWS = 20_000


def model(y=Y):
    """``theta_j ~ N(0, 2^2)``, ``y_j ~ N(theta_j, 1)``: ``theta_j | y ~ N(0.8 y_j, 0.8)``;
    ``s`` (not in the likelihood) keeps its prior ``LogNormal(0, 0.5)``. The posterior is
    mean field and Normal in the unconstrained space, so it is in every family below."""
    pyro.sample("s", dist.LogNormal(0.0, 0.5))
    with pyro.plate("j", len(y)):
        theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


@pytest.mark.parametrize(
    "guide_cls",
    [
        ag.AutoNormalMessenger,
        pytest.param(ag.AutoHierarchicalNormalMessenger, marks=pytest.mark.slow),  # 12 s
        pytest.param(ag.AutoRegressiveMessenger, marks=pytest.mark.slow),  # 35 s
    ],
)
def test_messenger_guide_fits_a_posterior_in_its_family(guide_cls):
    """After 150 updates (exact scores, Adam(1e-2)), means within 0.05 posterior sd and sds
    within 5% (20,000 draws: Monte Carlo error 0.007 sd and 0.5%; the rest is the last
    updates' particles)."""
    pyro.set_rng_seed(0)
    guide = guide_cls(model)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    for _ in range(150):
        svi.step()
    assert svi.num_rejected == 0
    with torch.no_grad(), pyro.plate("draws", NUM_DRAWS, dim=-2):
        trace = poutine.trace(guide).get_trace()
    theta = trace.nodes["theta"]["value"].reshape(NUM_DRAWS, -1)
    log_s = trace.nodes["s"]["value"].log().reshape(-1)
    sd = 0.8**0.5
    assert torch.all((theta.mean(0) - 0.8 * Y).abs() < 0.05 * sd)
    assert torch.all((theta.std(0) / sd - 1).abs() < 0.05)
    assert abs(log_s.mean()) < 0.05 * 0.5 and abs(log_s.std() / 0.5 - 1) < 0.05
