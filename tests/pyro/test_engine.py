"""ProximalScoreVI (Pyro) against exact posteriors, and as a drop-in for SVI."""

import gc
import warnings
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
    init_to_value,
)

from psvi.contrib.targets import earnings_data, earnings_posterior, ill_conditioned_gaussian
from psvi.metrics import gaussian_kl
from pyro_psvi import ProximalScoreVI
from pyro_psvi.contrib.models import earnings_regression, gaussian_target, linear_regression, mlp_classifier
from pyro_psvi.guides import guide_density
from pyro_psvi.objective import FisherStatistics, proximal_objective
from pyro_psvi.scores import log_joints, model_scores

pytestmark = pytest.mark.usefixtures("fresh_pyro")


def mvn_moments(guide):
    posterior = guide.get_posterior()
    return (
        posterior.loc.detach().double().numpy(),
        posterior.covariance_matrix.detach().double().numpy(),
    )


@pytest.mark.slow  # the NumPyro twin runs by default (suite time)
def test_ill_conditioned_gaussian_full_covariance():
    """D=20, condition number 1e4: forward KL < 1e-2 within 3,000 score calls.

    As the NumPyro test: the KL checked every 200 calls drops below 1e-2 by 3,000
    calls, and never diverges afterwards.
    """
    dim = 20
    mean, cov = ill_conditioned_gaussian(dim, 1e4, seed=0)
    model = gaussian_target(mean, cov)
    guide = AutoMultivariateNormal(
        model, init_loc_fn=init_to_value(values={"x": torch.zeros(dim)}), init_scale=0.1
    )
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    kls = []
    for _ in range(4000 // 200):
        svi.run(200 // svi.num_particles)
        kls.append(gaussian_kl(mean, cov, *mvn_moments(guide)))
    assert svi.num_score_calls == 4000 and svi.num_rejected == 0
    first = next(i for i, kl in enumerate(kls) if kl < 1e-2)
    assert (first + 1) * 200 <= 3000
    # Diverging fits reach KL 1e3 to 1e7 (docs/gaussian_study.md); constant-step Adam
    # jitters after convergence (spikes to ~0.1, docs/gaussian_targets.md). KL < 1
    # separates the two.
    assert max(kls[first:]) < 1.0


@pytest.mark.parametrize(
    "guide_cls",
    # AutoDiagonalNormal slow (22 s, the suite's budget): its NumPyro twin runs by default.
    [AutoNormal, pytest.param(AutoDiagonalNormal, marks=pytest.mark.slow)],
)
def test_diagonal_target_exact_moments(guide_cls):
    """With exact scores, q = target is a fixed point that the fit reaches to float precision."""
    mean, cov = ill_conditioned_gaussian(8, 1e2, seed=1, diagonal=True)
    model = gaussian_target(mean, cov)
    guide = guide_cls(model, init_loc_fn=init_to_value(values={"x": torch.zeros(8)}))
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    svi.run(800)
    if guide_cls is AutoNormal:
        loc, scale = (v.detach().numpy() for v in guide._get_loc_and_scale("x"))
    else:
        loc, scale = guide.loc.detach().numpy(), guide.scale.detach().numpy()
    sd = np.sqrt(np.diag(cov))
    # Exact fixed point: only float32 round-off and the last steps' particle noise remain.
    np.testing.assert_allclose(loc, mean, atol=0.02 * sd.min())
    np.testing.assert_allclose(scale**2, np.diag(cov), rtol=0.02)


def test_warm_start_from_svi():
    """A ProximalScoreVI built on a guide that SVI has fitted continues from the param store
    (the "ADVI, then ProximalScoreVI" recipe of docs/uci.md): its first step starts at SVI's
    values, and the fit then reaches the exact fixed point (tolerances as in the test above)."""
    mean, cov = ill_conditioned_gaussian(8, 1e2, seed=1, diagonal=True)
    model = gaussian_target(mean, cov)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"x": torch.zeros(8)}), init_scale=0.01)
    advi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=4))
    for _ in range(150):
        advi.step()
    advi_loc, advi_scale = (v.detach().clone().numpy() for v in guide._get_loc_and_scale("x"))
    # After 150 ADVI steps the scales are still far from the target's (ADVI moves them slowly).
    assert np.abs(np.log(advi_scale**2 / np.diag(cov))).max() > 0.5
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    start = (v.detach().numpy() for v in guide._get_loc_and_scale("x"))
    np.testing.assert_array_equal(np.stack(list(start)), np.stack([advi_loc, advi_scale]))
    svi.run(400)
    loc, scale = (v.detach().numpy() for v in guide._get_loc_and_scale("x"))
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(loc, mean, atol=0.02 * sd.min())
    np.testing.assert_allclose(scale**2, np.diag(cov), rtol=0.02)


def regression_data(n=400, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = np.array([1.0, -2.0, 0.5])[:dim]
    y = (x @ w + rng.normal(size=n)).astype(np.float32)
    return torch.as_tensor(x), torch.as_tensor(y)


def test_vectorized_and_sequential_particles_agree():
    """One vectorized pass gives the log joints and scores of one-particle passes."""
    x, y = regression_data(n=50)
    model = partial(mlp_classifier, hidden=5, num_classes=3, subsample_size=20)
    labels = (y > 0).long() + (y > 1).long()
    guide = AutoNormal(model)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    svi.step(x, labels)
    assert svi.vectorize_particles
    density = svi.density
    u = torch.randn(4, density.latent_dim)
    common = dict(max_plate_nesting=1, subsample={})
    vectorized = log_joints(model, density, u, (x, labels), {}, vectorize=True, **common)
    sequential = log_joints(model, density, u, (x, labels), {}, vectorize=False, **common)
    torch.testing.assert_close(vectorized, sequential)
    pyro.set_rng_seed(1)
    lj_v, g_v, *_ = model_scores(model, density, u, (x, labels), {}, max_plate_nesting=1, vectorize=True)
    pyro.set_rng_seed(1)
    lj_s, g_s, *_ = model_scores(model, density, u, (x, labels), {}, max_plate_nesting=1, vectorize=False)
    torch.testing.assert_close(lj_v, lj_s)
    torch.testing.assert_close(g_v, g_s)


def test_sequential_particles_hold_one_graph_at_a_time():
    """With vectorize_particles=False each particle's autograd graph is freed before the
    next particle's pass, as in Trace_ELBO's loop: the tensors saved for backward at any
    moment are those of one pass, however many particles (S graphs at once would hold
    S times as many)."""
    x, y = regression_data(n=50)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], 4), 1.0).to_event(2))
        with pyro.plate("data", len(x), subsample_size=20) as idx:
            pyro.sample("y", dist.Normal(torch.tanh(x[idx] @ w).sum(-1), 1.0), obs=y[idx])

    guide = AutoNormal(model)
    ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2})).step(x, y)
    density = guide_density(guide)
    live, peak = [0], [0]

    class Saved:
        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def __del__(self) -> None:
            live[0] -= 1

    def peak_saved(num_particles: int) -> int:
        u = torch.randn(num_particles, density.latent_dim)
        with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
            model_scores(model, density, u, (x, y), {}, max_plate_nesting=1, vectorize=False)
        assert live[0] == 0
        held, peak[0] = peak[0], 0
        return held

    assert peak_saved(1) > 0
    assert peak_saved(4) == peak_saved(1)


def test_the_fisher_statistics_are_freed_before_the_inner_steps(monkeypatch):
    """The optimizer's inner steps on a diagonal guide read the split objective's own
    constants, not the step's per-coordinate sums over the particles (five D-vectors,
    docs/scale.md's memory map): no FisherStatistics is alive while they run."""
    x, y = regression_data(n=50)

    def model(x, y):
        linear_regression(x, y, subsample_size=20)

    engine = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}))
    inner_fit, alive = ProximalScoreVI.inner_fit, []

    def counted(self, problem, leaves):
        gc.collect()
        alive.append(sum(isinstance(held, FisherStatistics) for held in gc.get_objects()))
        return inner_fit(self, problem, leaves)

    monkeypatch.setattr(ProximalScoreVI, "inner_fit", counted)
    for _ in range(2):
        engine.step(x, y)
    assert alive == [0, 0]


def test_broadcast_unsafe_model_falls_back_with_warning():
    """docs/pitfalls.md: `x @ W + b` with a particle dim counts the data once per particle pair.

    The engine detects it on its first step, warns, and evaluates particles one at a
    time, so the fit is the same as with vectorize_particles=False.
    """
    x, y = regression_data(n=60)

    def unsafe(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal((x @ w.unsqueeze(-1)) + b, 1.0).to_event(1), obs=y[:, None])

    svi = ProximalScoreVI(unsafe, AutoNormal(unsafe), pyro.optim.Adam({"lr": 1e-2}))
    with pytest.warns(UserWarning, match="cannot evaluate this model's particles"):
        svi.step(x, y)
    assert not svi.vectorize_particles


def test_minibatch_gradient_is_unbiased():
    """At fixed particles, E_batch[grad L_t] equals the full-data grad L_t."""
    x, y = regression_data(n=200)
    model_full = partial(linear_regression, subsample_size=None)
    model_mb = partial(linear_regression, subsample_size=20)
    guide = AutoDiagonalNormal(model_full)
    svi = ProximalScoreVI(model_full, guide, pyro.optim.Adam({"lr": 1e-2}))
    svi.evaluate_loss(x, y)  # sets up the guide and density
    density = svi.density
    params_t = {k: pyro.param(k).detach() for k in density.param_names}
    loc_name, scale_name = density.param_names
    particles = density.sample(params_t, 4)
    leaves = {
        loc_name: (params_t[loc_name] + 0.3).requires_grad_(True),
        scale_name: (params_t[scale_name] * 1.5).requires_grad_(True),
    }

    def grad_for(model):
        _, scores, *_ = model_scores(
            model, density, particles, (x, y), {}, max_plate_nesting=1, vectorize=True
        )
        loss, _ = proximal_objective(
            density, leaves, params_t, particles, scores, prox_weight=1.0, weighting="covariance"
        )
        return torch.cat(torch.autograd.grad(loss, list(leaves.values())))

    full = grad_for(model_full)
    grads = torch.stack([grad_for(model_mb) for _ in range(2000)]).double()
    se = grads.std(0) / np.sqrt(len(grads))
    # 6 coordinates: a 5-standard-error band fails by chance with probability < 4e-6.
    assert torch.all((grads.mean(0) - full).abs() < 5 * se)
    # ... and the mini-batch gradients really are noisy (the test is not vacuous).
    assert torch.all(grads.std(0) > 1e-3 * full.abs())


@pytest.mark.slow  # 1,000 Pyro steps (14-24 s here); the NumPyro twin runs by default
def test_constrained_gamma_poisson():
    """Positive latent: lam ~ Gamma(a, b), y ~ Poisson(lam); exact posterior Gamma(a + sum y, b + N)."""
    y = torch.as_tensor(np.random.default_rng(0).poisson(4.0, size=60), dtype=torch.float32)
    a, b = 2.0, 1.0

    def model(y):
        lam = pyro.sample("lam", dist.Gamma(a, b))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Poisson(lam), obs=y)

    guide = AutoNormal(model)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    svi.run(500, y)
    means = []
    for _ in range(500):  # average the log-normal mean over iterates (particle noise)
        svi.step(y)
        loc, scale = guide._get_loc_and_scale("lam")
        means.append(float(torch.exp(loc + scale**2 / 2).detach()))
    shape = a + float(y.sum())
    exact_mean = shape / (b + len(y))
    # The best log-normal for Gamma(shape, rate) (Laplace in log space) has mean
    # (shape + 1/2)/rate: a relative bias of 1/(2 shape); allow twice that.
    assert abs(np.mean(means) / exact_mean - 1) < 1.0 / shape


@pytest.mark.slow  # the NumPyro twin runs by default (suite time): test_simplex_and_dependent_interval
def test_simplex_posterior_mean():
    """Dirichlet-multinomial (simplex) recovers the exact posterior mean."""
    counts = torch.tensor([30.0, 10.0, 60.0])
    alpha = torch.tensor([1.0, 2.0, 1.0])

    def model():
        p = pyro.sample("p", dist.Dirichlet(alpha))
        pyro.sample("counts", dist.Multinomial(total_count=100, probs=p), obs=counts)

    guide = AutoMultivariateNormal(model)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    losses = svi.run(1000)
    draws = Predictive(model, guide=guide, num_samples=4000, return_sites=["p"])()
    exact = (alpha + counts) / (alpha + counts).sum()
    # Posterior sd of each p_k is about 0.045; a Gaussian in stick-breaking space is
    # close to a Dirichlet with 104 pseudo-counts; 0.1 sd covers both errors.
    torch.testing.assert_close(draws["p"].mean(0), exact, atol=0.0045 + 3 * 0.045 / 4000**0.5, rtol=0)
    assert torch.isfinite(losses).all()


def swap_script(make_engine):
    """A Pyro user's script; only the engine construction differs."""
    x, y = regression_data(n=100)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0], subsample_size=25) as idx:
            mean = x[idx] @ w
            pyro.sample("y", dist.Normal(mean, sigma), obs=None if y is None else y[idx])

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    svi = make_engine(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    for _ in range(500):
        loss = svi.step(x, y)
    assert isinstance(loss, float) and isinstance(svi.evaluate_loss(x, y), float)
    predictive = Predictive(model, guide=guide, num_samples=50)
    pred = predictive(x)
    posterior = Predictive(model, guide=guide, num_samples=500, return_sites=["w"])(x)
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return params, posterior, pred, guide.median(), guide.quantiles([0.25, 0.75])


# A typical user model (`x @ w`) is not broadcast-safe: the engine warns and falls back.
@pytest.mark.filterwarnings("ignore:ProximalScoreVI cannot evaluate")
def test_swap_for_svi():
    ref = swap_script(lambda m, g, o: SVI(m, g, o, Trace_ELBO()))
    ours = swap_script(lambda m, g, o: ProximalScoreVI(m, g, o))
    assert set(ours[0]) == set(ref[0])
    assert ours[2]["y"].shape == ref[2]["y"].shape == (50, 25)
    # Both reach the same posterior: posterior sd of w is ~0.1, allow 3 of them.
    torch.testing.assert_close(ours[1]["w"].mean(0), ref[1]["w"].mean(0), atol=0.3, rtol=0)
    assert set(ours[3]) == {"w", "sigma"}
    assert set(ours[4]) == {"w", "sigma"}


def test_pyro_optimizers_and_schedulers():
    model = gaussian_target(np.zeros(2), np.eye(2))
    clipped = pyro.optim.ClippedAdam({"lr": 1e-2, "clip_norm": 1.0, "lrd": 0.999})
    scheduler = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-2}, "gamma": 0.99}
    )
    for optim in (clipped, scheduler, pyro.optim.SGD({"lr": 1e-3})):
        pyro.clear_param_store()
        svi = ProximalScoreVI(model, AutoDiagonalNormal(model), optim, num_particles=3)
        for _ in range(20):
            assert np.isfinite(svi.step())
        if optim is scheduler:
            scheduler.step()
        assert svi.num_score_calls == 60
        assert optim.get_state()  # the optimizer state lives in the PyroOptim
    with pytest.raises(TypeError, match="pyro.optim optimizer"):
        ProximalScoreVI(model, AutoNormal(model), torch.optim.Adam)


@pytest.mark.slow  # the NumPyro twin runs by default (suite time)
def test_lowrank_guide_fits_gaussian():
    mean, cov = ill_conditioned_gaussian(6, 10.0, seed=2)
    model = gaussian_target(mean, cov)
    guide = AutoLowRankMultivariateNormal(model, rank=5)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
    svi.run(600)
    posterior = guide.get_posterior()
    kl = gaussian_kl(
        mean, cov, posterior.loc.detach().double().numpy(),
        posterior.covariance_matrix.detach().double().numpy(),
    )  # fmt: skip
    # Rank 5 + diagonal can represent any 6x6 covariance: the fit must get close.
    assert kl < 0.05


def test_non_finite_step_is_rejected():
    """A model whose log density is NaN in part of the space: such steps are rejected."""

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("bad", torch.where(x > 3.0, torch.nan, 0.0))

    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"x": torch.tensor(3.0)}), init_scale=1.0)
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), vectorize_particles=False)
    # Pyro's validation would raise on the NaN first; without it the engine must cope.
    with pyro.validation_enabled(False):
        assert_the_next_step_is_rejected(svi)


def assert_the_next_step_is_rejected(svi: ProximalScoreVI) -> None:
    """``svi``'s next step is rejected with the warning and a NaN loss, the params are kept
    bit for bit and the optimizer's state stays finite."""
    svi.evaluate_loss()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.warns(RuntimeWarning, match="rejected 1 update"):
        loss = svi.step()
    assert svi.num_rejected == 1 and not np.isfinite(loss)
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(value.detach(), before[name], rtol=0, atol=0)
    for optimizer in svi.optim.optim_objs.values():
        for state in optimizer.state.values():
            assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


def _scale_model():
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))  # support [0, inf): 0 passes its check
    pyro.sample("y", dist.Normal(0.0, sigma), obs=torch.tensor(0.5))


def test_particles_overflowing_their_bijection_get_a_nan_log_joint():
    """exp(900) = inf and exp(-900) = 0 are no values of ``sigma`` (the Normal's scale
    must be positive): with Pyro's validation on, such particles get a NaN log joint,
    where the model raised; the others are exact."""
    svi = ProximalScoreVI(_scale_model, AutoNormal(_scale_model), pyro.optim.Adam({"lr": 1e-2}))
    svi.step()
    u = torch.tensor([[0.3], [900.0], [-900.0]])
    sigma = u[0].exp()
    exact = dist.HalfNormal(1.0).log_prob(sigma) + dist.Normal(0.0, sigma).log_prob(torch.tensor(0.5))
    with pyro.validation_enabled(True):
        for vectorize in (True, False):
            got = log_joints(
                _scale_model, svi.density, u, (), {}, subsample={}, max_plate_nesting=0, vectorize=vectorize
            )
            torch.testing.assert_close(got[0], (exact + u[0]).squeeze())  # + log|det J| of exp
            assert torch.isnan(got[1:]).all()


def test_a_step_whose_particles_overflow_is_rejected():
    """A guide so wide that its draws of log sigma overflow ``exp``: the step is rejected
    (params and optimizer state kept), as NumPyro's is, instead of Pyro's validation error."""
    init = init_to_value(values={"sigma": torch.tensor(1.0)})
    guide = AutoNormal(_scale_model, init_loc_fn=init, init_scale=1e4)  # P(|u| < 88) ~ 0.007 a draw
    svi = ProximalScoreVI(_scale_model, guide, pyro.optim.Adam({"lr": 1e-2}))
    with pyro.validation_enabled(True):
        assert_the_next_step_is_rejected(svi)


class _PoisonedAdam(torch.optim.Adam):
    """Adam that writes inf into its state after each step (its updates stay finite), as
    float32 Adam's second moment becomes inf when a gradient exceeds 1.8e19."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["moment"] = torch.full_like(param, torch.inf)
        return loss


def test_a_grown_step_whose_guide_overflows_the_fisher_term_is_undone():
    """As NumPyro's twin: after a grown step (4x budget) to sds 1e6 on a model of
    curvature 1e25, the next update's Fisher term is inf and its ``-ELBO`` estimate
    finite; the grown step is undone (the last iterate is the guide it started from, no
    rejection) where before it was rejected and the wide guide kept."""

    def steep_model():
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("steep", -0.5e25 * (x**2).sum(-1))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(steep_model, init_scale=1e-12)
    svi = ProximalScoreVI(steep_model, guide, pyro.optim.Adam({"lr": 1e-2}))
    svi.step()  # sets the engine up
    assert svi.inner_solver == "closed_form" and svi.num_rejected == 0
    started = {name: value.clone() for name, value in svi._iterate.items()}
    leaves = svi._leaves(model_params=True)
    with torch.no_grad():  # the grown step's result: sds 1e6, from the guide it started from
        for name, value in svi._guide_leaves(torch.zeros(2), 1e6 * torch.eye(2)).items():
            leaves[name].copy_(value)
            svi._iterate[name].copy_(value)
    loc_t, tril_t = svi._loc_scale(svi._constrain(started))
    svi.averages = svi.averages._replace(
        trust=svi.averages.trust._replace(
            scale=torch.tensor(4.0), last_cut=torch.tensor(True), last_loss=torch.tensor(10.0),
            last_error=torch.tensor(0.0), loc=loc_t, guide_scale=tril_t,
        )
    )  # fmt: skip
    loss = svi.step()
    assert np.isfinite(loss) and svi.num_rejected == 0
    for name, value in started.items():
        torch.testing.assert_close(svi._iterate[name], value)


def test_step_leaving_a_non_finite_optimizer_state_is_rejected():
    """A step with finite params whose optimizer state is not finite is rejected: the
    params and the state before it are kept, so later steps are not spoiled (with the
    params checked alone this step was accepted and every later one rejected)."""
    model = gaussian_target(torch.zeros(2), torch.eye(2))
    guide = AutoDiagonalNormal(model)
    svi = ProximalScoreVI(model, guide, pyro.optim.PyroOptim(_PoisonedAdam, {"lr": 1e-2}))
    assert_the_next_step_is_rejected(svi)


def test_user_given_subsample_indices():
    """`pyro.plate(..., subsample=idx)`: the likelihood of the given rows, scaled by N/B."""
    x, y = regression_data(n=40)
    idx = torch.arange(0, 40, 4)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(x), subsample=idx) as rows:
            pyro.sample("y", dist.Normal((x[rows] * w).sum(-1), 1.0), obs=y[rows])

    svi = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}))
    svi.step(x, y)
    assert svi.vectorize_particles
    u = torch.randn(3, 3)
    got = log_joints(model, svi.density, u, (x, y), {}, subsample={}, max_plate_nesting=1, vectorize=True)
    prior = dist.Normal(0.0, 1.0).log_prob(u).sum(-1)
    likelihood = dist.Normal(u @ x[idx].T, 1.0).log_prob(y[idx]).sum(-1)
    torch.testing.assert_close(got, prior + 4.0 * likelihood)


def test_a_model_with_an_improper_uniform_site_is_fitted():
    # ImproperUniform has no draws: the model checks draw its unconstrained value
    # uniformly in (-2, 2) instead (Pyro's init_to_uniform samples it first and failed).
    # The log density is a proper LogNormal's in log sigma (a Normal(0, 1) factor on it):
    # the fit ends near its mean 0 and sd 1 (200 updates, S = 16: MC error ~0.1).
    def model():
        sigma = pyro.sample("sigma", dist.ImproperUniform(dist.constraints.positive, (), ()))
        pyro.factor("prior", dist.Normal(0.0, 1.0).log_prob(sigma.log()) - sigma.log())

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"sigma": torch.tensor(2.0)}))
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 0.05}), num_particles=16)
    for _ in range(200):
        svi.step()
    loc, scale = guide._get_loc_and_scale("sigma")
    assert abs(float(loc)) < 0.3 and abs(float(scale) - 1) < 0.3, (float(loc), float(scale))


def test_far_start_reaches_an_exact_gaussian_posterior():
    """As the NumPyro test: a posterior 300-3,000 of its sds from the start, reached by the
    closed-form step's growing KL budget in under 150 steps (KL < 0.01: the family holds
    the Gaussian target exactly)."""
    pyro.set_rng_seed(0)
    mean, cov = np.array([100.0, -50.0, 30.0]), np.diag([0.01, 0.04, 0.0025])
    model = gaussian_target(mean, cov)
    init = init_to_value(values={"x": torch.zeros(3)})
    guide = AutoMultivariateNormal(model, init_loc_fn=init, init_scale=1.0)
    engine = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=4)
    for _ in range(150):
        engine.step()
    loc = guide.loc.detach().double().numpy()
    q_cov = guide.get_posterior().covariance_matrix.detach().double().numpy()
    assert gaussian_kl(mean, cov, loc, q_cov) < 0.01


def test_earnings_in_dollars_from_init_to_median_reaches_the_posterior():
    """Earnings on height in dollars (sds 1e4 and 160 for the coefficients, 0.02 for log
    sigma) from Pyro's init_to_median: coefficients ~4e5 off and sigma 0.67 against
    ~19,500, a likelihood curvature ~1e17 times the guide's precision. Before, every step
    was rejected (the step's fraction floor, 2^-40, too large); with that fixed, the KL
    budget capped at 1024x crawled (log sigma 4.4 of 9.9 after 360 steps). Reference:
    :func:`earnings_posterior` (the Normal(0, 1e6) priors shift means by ~5e-4 sd). A
    Gaussian holds it to ~1e-3 sd and the stationary fit's jitter is ~0.01 sd (probes):
    0.2 sd and 20% are the issue's band, which a crawling fit misses by thousands of sds."""
    pyro.set_rng_seed(0)
    height, earn = earnings_data()
    ref_mean, ref_sd = earnings_posterior(height, earn)

    data = (torch.tensor(height, dtype=torch.float32), torch.tensor(earn, dtype=torch.float32))
    guide = AutoMultivariateNormal(earnings_regression, init_loc_fn=init_to_median)
    engine = ProximalScoreVI(earnings_regression, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an update or two rejected on the way
        for _ in range(400):
            engine.step(*data)
    loc, cov = mvn_moments(guide)
    assert np.all(np.abs(loc - ref_mean) / ref_sd < 0.2), (loc, ref_mean)
    assert np.all(np.abs(np.sqrt(np.diag(cov)) / ref_sd - 1) < 0.2), (np.sqrt(np.diag(cov)), ref_sd)
