"""Mini-batch scores (issue 19), Pyro: the right posterior with the defaults."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from psvi_testing import minibatch
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_psvi import ProximalScoreVI
from pyro_psvi.contrib.models import linear_regression
from pyro_psvi.guides import guide_density
from pyro_psvi.objective import curvature_statistics, fisher_statistics


def regression_model(x, y):
    linear_regression(x, y, subsample_size=minibatch.B)


def fit(lr: float, num_steps: int) -> tuple[np.ndarray, np.ndarray, ProximalScoreVI]:
    x, y = map(torch.as_tensor, minibatch.regression(seed=0))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = ProximalScoreVI(regression_model, AutoNormal(regression_model), pyro.optim.Adam({"lr": lr}))
    for _ in range(num_steps):
        svi.update(x, y)
    loc, scale = (pyro.param(f"AutoNormal.{name}.w").detach().double().numpy() for name in ("locs", "scales"))
    return loc, scale, svi


@pytest.mark.slow
@pytest.mark.parametrize("lr", [1e-2, 1e-3])
def test_subsampled_regression_has_the_exact_mean_field_posterior(lr):
    loc, scale, svi = fit(lr, minibatch.UPDATES)
    assert svi.num_rejected == 0
    minibatch.check_fit(loc, scale, *minibatch.regression(seed=0))


def test_subsampled_regression_sds_are_right_after_1000_steps():
    """The default run's shorter version (the 6000-step one is slow in Pyro): the sds,
    which issue 19's objective put at 0.6-0.8 of the exact ones, are within 20% (the
    curvature's error is ~3%, see ``check_fit``); the means, averaged over ~310
    effective updates (weights ``i^5``) of 4.5-sd noise (~0.26 sd standard error with
    independent batches, less with reshuffled ones), within 0.6 sd."""
    loc, scale, svi = fit(1e-2, 1000)
    assert svi.num_rejected == 0
    mean, sd = minibatch.mean_field_optimum(*minibatch.regression(seed=0))
    np.testing.assert_allclose(scale / sd, 1.0, atol=0.2)
    assert np.max(np.abs(loc - mean) / sd) < 0.6


@pytest.mark.slow
def test_reshuffled_regression_is_right_after_3000_steps():
    loc, scale, svi = fit(1e-2, minibatch.RESHUFFLED_UPDATES)
    assert svi.num_rejected == 0
    minibatch.check_reshuffled_fit(loc, scale, *minibatch.regression(seed=0))


@pytest.mark.slow
def test_reshuffled_regression_has_the_exact_full_covariance_posterior():
    x, y = map(torch.as_tensor, minibatch.correlated_regression(seed=0))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(regression_model)
    svi = ProximalScoreVI(regression_model, guide, pyro.optim.Adam({"lr": 1e-2}))
    for _ in range(minibatch.RESHUFFLED_UPDATES):
        svi.update(x, y)
    assert svi.split_covariance and svi.num_rejected == 0
    with torch.no_grad():
        posterior = guide.get_posterior()
        loc, cov = (a.double().numpy() for a in (posterior.loc, posterior.covariance_matrix))
    minibatch.check_full_covariance_fit(loc, cov, x.numpy(), y.numpy())


@pytest.mark.slow
def test_reshuffled_regression_has_the_exact_marginals_with_a_low_rank_guide():
    """~1.5 min. The NumPyro twin's bounds (:func:`minibatch.check_fit` on the marginals; the
    generic objective's mini-batch defaults, docs/minibatch.md section 15)."""
    x, y = map(torch.as_tensor, minibatch.regression(seed=0))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoLowRankMultivariateNormal(regression_model, rank=2)
    svi = ProximalScoreVI(regression_model, guide, pyro.optim.Adam({"lr": 1e-2}))
    for _ in range(minibatch.RESHUFFLED_UPDATES):
        svi.update(x, y)
    assert (svi.inner_steps, svi.average_iterates, svi.objective.prox_weight) == (5, True, 100.0)
    assert svi.num_rejected == 0
    with torch.no_grad():
        posterior = guide.get_posterior()
        loc, cov = (a.double().numpy() for a in (posterior.loc, posterior.covariance_matrix))
    minibatch.check_fit(loc, np.sqrt(np.diag(cov)), x.numpy(), y.numpy())


@pytest.mark.usefixtures("fresh_pyro")
def test_reshuffled_batches_cover_each_epoch_once():
    """N = 250, B = 100: the model sees two disjoint batches per epoch (50 members left
    out, as ``drop_last``), then a new permutation; every pass of a step the same batch."""
    seen: list[torch.Tensor] = []

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", 250, subsample_size=100) as idx:
            seen.append(idx)
            pyro.sample("y", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])

    x, y = torch.ones(250, 2), torch.zeros(250)
    optim = pyro.optim.Adam({"lr": 1e-2})
    svi = ProximalScoreVI(model, AutoNormal(model), optim, vectorize_particles=False)
    svi.step(x, y)  # set-up traces draw batches of their own
    epochs, batches = [], []
    for _ in range(6):
        seen.clear()
        svi.step(x, y)
        assert all(torch.equal(idx, seen[0]) for idx in seen)
        batches.append(seen[0])
        if svi.epoch_order.positions["data"] == 100:  # a new epoch began with this step
            epochs.append([])
        if epochs:
            epochs[-1].append(seen[0])
    for epoch in epochs[:-1]:
        members = torch.cat(epoch)
        assert len(epoch) == 2 and len(members.unique()) == 200 and int(members.max()) < 250
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))


def test_the_param_store_holds_the_average_and_a_checkpoint_the_iterate(tmp_path):
    _, _, svi = fit(1e-2, 3)
    averaged = svi.averages.params["AutoNormal.locs.w"]
    assert svi.batch_ratio == minibatch.N / minibatch.B
    assert torch.equal(pyro.param("AutoNormal.locs.w").detach(), averaged)
    assert not torch.equal(svi._iterate["AutoNormal.locs.w"], averaged)
    svi.save(tmp_path / "ckpt.pt")
    x, y = map(torch.as_tensor, minibatch.regression(seed=0))
    svi.update(x, y)
    after = pyro.param("AutoNormal.locs.w").detach().clone()
    resumed = ProximalScoreVI(regression_model, AutoNormal(regression_model), pyro.optim.Adam({"lr": 1e-2}))
    resumed.load(tmp_path / "ckpt.pt")
    resumed.update(x, y)
    assert torch.equal(pyro.param("AutoNormal.locs.w").detach(), after)


def _flow_fit(num_steps: int, hidden_dim: list[int]) -> tuple[ProximalScoreVI, AutoIAFNormal]:
    x, y = map(torch.as_tensor, minibatch.regression(seed=0))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoIAFNormal(regression_model, hidden_dim=hidden_dim, num_transforms=2)
    svi = ProximalScoreVI(regression_model, guide, pyro.optim.Adam({"lr": 1e-2}))
    for _ in range(num_steps):
        svi.update(x, y)
    return svi, guide


def test_a_flow_with_mini_batch_scores_steps_without_the_fisher_term_until_past_the_budget():
    """At most five inner steps, stopped after the first that moves the map further than
    the trust region's budget: one step when Adam(1) leaves it at once, all five when
    Adam(1e-6) stays within it (the optimizer's step counts)."""
    x, y = map(torch.as_tensor, minibatch.regression(seed=0))
    for lr, steps in ((1.0, 1), (1e-6, 5)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        optim = pyro.optim.Adam({"lr": lr})
        svi = ProximalScoreVI(regression_model, AutoIAFNormal(regression_model, hidden_dim=[8]), optim)
        svi.update(x, y)
        assert (svi.inner_steps, svi.average_iterates, svi.trust_region_scale) == (5, True, 1.0)
        assert svi.stops_at_budget and svi.transport_fisher_weight == 0.0
        assert svi.num_rejected == 0
        assert {int(state["state"][0]["step"]) for state in optim.get_state().values()} == {steps}
        svi.update(x, y)  # the first update's average is its iterate
        names = svi.density.param_names  # the param store holds the average, not the iterate
        assert not all(torch.equal(pyro.param(name).detach(), svi._iterate[name]) for name in names)
    # Without a trust region there is no budget to stop at: one step per update, as before.
    pyro.clear_param_store()
    guide = AutoIAFNormal(regression_model, hidden_dim=[8])
    svi = ProximalScoreVI(regression_model, guide, pyro.optim.Adam({"lr": 1e-2}), trust_region=None)
    svi.update(x, y)
    assert svi.inner_steps == 1 and not svi.stops_at_budget


@pytest.mark.slow
def test_a_flow_with_mini_batch_scores_has_the_exact_posterior():
    svi, guide = _flow_fit(minibatch.RESHUFFLED_UPDATES, [16, 16])
    assert svi.num_rejected == 0
    x, y = map(torch.as_tensor, minibatch.regression(seed=0))
    with torch.no_grad(), pyro.plate("draws", 20000):
        draws = guide(x, y)["w"]
    minibatch.check_flow_fit(draws.double().numpy(), *minibatch.regression(seed=0))


def test_a_shift_common_to_all_scores_leaves_the_curvature_unchanged():
    """The mini-batch noise is (to first order) one shift of every particle's score; the
    curvature statistics centre it away, exactly (an algebraic identity)."""
    pyro.clear_param_store()
    guide = AutoNormal(lambda: pyro.sample("z", dist.Normal(torch.zeros(6), 1.0).to_event(1)))
    guide()
    density = guide_density(guide)
    params_t = {
        "AutoNormal.locs.z": torch.linspace(-1, 1, 6),
        "AutoNormal.scales.z": torch.linspace(0.2, 2, 6),
    }
    generator = torch.Generator().manual_seed(0)
    particles = density.sample(params_t, 4)
    scores = torch.randn(particles.shape, generator=generator)
    shift = 50.0 * torch.randn(particles.shape[1:], generator=generator)
    scale_t = params_t["AutoNormal.scales.z"]
    plain = curvature_statistics(fisher_statistics(density, params_t, particles, scores), scale_t)
    shifted = curvature_statistics(fisher_statistics(density, params_t, particles, scores + shift), scale_t)
    for a, b in zip(plain, shifted, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
