"""The exact inner solve of user guides with linear scores (Pyro): a mean-field guide of
Beta, Gamma, InverseGamma, LogNormal and Normal sites whose args are its params has an
update's proximal problem convex in the sites' natural parameters, one problem in two
unknowns per coordinate (``pyro_psvi.objective.linear_score_solve``). Checked: the
log-partition identities it rests on, its solution against the guide-run objective's
gradient, exact posteriors of conjugate models from a far start at a small learning
rate, and which guides and settings take it."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints, kl_divergence

import pyro_psvi
from psvi.objective import inner_objective_scale
from pyro_psvi.guides import _LINEAR_SCORES, LinearScoreRule


def _rule_args(rule: LinearScoreRule, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Two random arg pairs of ``rule``'s family (float64): positive ones, or a real loc."""
    a_t, b_t, a, b = (0.5 + 10 * torch.rand(7, generator=generator, dtype=torch.float64) for _ in range(4))
    if rule.natural is not None:  # (loc, scale)
        a_t, a = a_t - 5, a - 5
    return a_t, b_t, a, b


@pytest.mark.parametrize("key", list(_LINEAR_SCORES), ids=lambda key: f"{key[0].__name__}-{key[1]}")
def test_log_partition_gives_the_kl_and_its_own_derivatives(key):
    """Each rule's ``log_partition`` ``A`` in the natural coordinates ``e``: ``KL(q_t || q)
    = A(e) - A(e_t) - grad A(e_t) . (e - e_t)`` (a Bregman divergence, as for every
    exponential family) equals torch's ``kl_divergence`` of the rule's family, and
    ``log_partition_derivatives`` are ``A``'s gradient and Hessian by autograd (float64:
    1e-9 relative, round-off of lgamma sums of size 10); ``inf`` outside the domain."""
    rule = _LINEAR_SCORES[key]
    a_t, b_t, a, b = _rule_args(rule, torch.Generator().manual_seed(0))
    natural = rule.natural or (lambda x, y: (x, y))
    e_t, e = natural(a_t, b_t), natural(a, b)
    grad_t = rule.log_partition_derivatives(*e_t)[:2]
    bregman = rule.log_partition(*e) - rule.log_partition(*e_t)
    bregman = bregman - sum(g * (x - x_t) for g, x, x_t in zip(grad_t, e, e_t, strict=True))
    torch.testing.assert_close(
        bregman, kl_divergence(rule.family(a_t, b_t), rule.family(a, b)), rtol=1e-9, atol=1e-12
    )
    inputs = [part.clone().requires_grad_(True) for part in e]
    grads = torch.autograd.grad(rule.log_partition(*inputs).sum(), inputs, create_graph=True)
    second = [torch.autograd.grad(grad.sum(), inputs, retain_graph=True) for grad in grads]
    want = (grads[0], grads[1], second[0][0], second[0][1], second[1][1])
    for got, expected in zip(rule.log_partition_derivatives(*e), want, strict=True):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-9, atol=1e-12)
    if rule.from_natural is not None:
        for got, expected in zip(rule.from_natural(*e), (a, b), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    outside = rule.log_partition(*(torch.tensor([-1.0], dtype=torch.float64),) * 2)
    assert bool(torch.isinf(outside).all())


def _model():
    """Beta, Gamma, InverseGamma, LogNormal and Normal latents, each with data."""
    f = pyro.sample("f", dist.Beta(2.0, 2.0))
    t = pyro.sample("t", dist.Gamma(2.0, 2.0))
    v = pyro.sample("v", dist.InverseGamma(3.0 * torch.ones(2), 2.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    m = pyro.sample("m", dist.Normal(0.0, 3.0))
    with pyro.plate("i", 10):
        pyro.sample("obs", dist.Bernoulli(f), obs=torch.tensor([1.0] * 7 + [0.0] * 3))
        pyro.sample("y", dist.Normal(m, (t * s).rsqrt()), obs=torch.linspace(-1.0, 2.0, 10))
    pyro.sample("w", dist.Normal(0.0, v.sqrt()).to_event(1), obs=torch.tensor([0.5, -1.5]))


def _guide():
    """Args read as elements of a vector param, a softplus param beside a constant (the
    Gamma's concentration and the InverseGamma's rate), and Normal-family sites."""
    ab = pyro.param("ab", torch.tensor([15.0, 12.0]), constraint=constraints.positive)
    rate = pyro.param("rate", torch.tensor(3.0), constraint=dist.constraints.softplus_positive)
    concentration = pyro.param("concentration", 4.0 * torch.ones(2), constraint=constraints.positive)
    loc = pyro.param("loc", torch.tensor([0.3, -0.2]))
    scale = pyro.param("scale", torch.tensor([0.7, 1.5]), constraint=constraints.positive)
    pyro.sample("f", dist.Beta(ab[0], ab[1]))
    pyro.sample("t", dist.Gamma(2.5, rate))
    pyro.sample("v", dist.InverseGamma(concentration, 3.0).to_event(1))
    pyro.sample("s", dist.LogNormal(loc[0], scale[0]))
    pyro.sample("m", dist.Normal(loc[1], scale[1]))


def _problems(monkeypatch, model, guide, updates, **options) -> tuple[pyro_psvi.ProximalScoreVI, list]:
    """An engine after ``updates`` updates from seed 0 (Adam(0.05), 4 particles, the cost
    advice silenced) and each update's :class:`ProximalProblem`."""
    problems = []
    build = pyro_psvi.proximal.ProximalScoreVI.proximal_problem

    def kept(self, *args):
        problems.append(build(self, *args))
        return problems[-1]

    monkeypatch.setattr(pyro_psvi.proximal.ProximalScoreVI, "proximal_problem", kept)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    engine = pyro_psvi.ProximalScoreVI(
        model, guide, pyro.optim.Adam({"lr": 0.05}), num_particles=4, **options
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(updates):
            engine.step()
    return engine, problems


def _gradients(engine, problem, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients in the unconstrained params of the solved names of the update's
    Fisher term and of its ``KL(q_t || q)``, both computed the generic way: the sites'
    scores and KLs from runs of the guide, autograd through the params' constraints (not
    the sums the solve read)."""
    names = list(problem.solution)
    transforms = engine._transforms
    leaves = {name: transforms[name].inv(params[name]).detach().requires_grad_(True) for name in names}
    constrained = dict(problem.params_t)
    constrained.update({name: transforms[name](leaf) for name, leaf in leaves.items()})
    weight = engine.objective.prox_weight
    objective = problem.objective(constrained) / inner_objective_scale(weight)
    kl = engine.density.kl(problem.params_t, constrained, problem.kl_seed)
    grads = []
    for value in (objective, kl):
        parts = torch.autograd.grad(value, list(leaves.values()), retain_graph=True)
        grads.append(torch.cat([part.reshape(-1) for part in parts]))
    return grads[0] - weight * grads[1], grads[1]


@pytest.mark.parametrize("trust_region", [None, 0.02], ids=["no trust region", "default trust region"])
def test_the_solve_is_the_minimum_of_the_guide_run_objective(trust_region, monkeypatch, fresh_pyro):
    """Each update's solution is stationary for ``F + w KL(q_t || q)`` (``_gradients``):
    without a trust region at the update's weight, with one at the weight of the ladder
    ``prox_weight * 2^k`` it chose (read off the two gradients: ``w = -<F', KL'> /
    |KL'|^2``, a power of two of the update's weight to 1%), its KL then within the budget.
    The residual ``|F' + w KL'|`` is below 1e-3 of ``|F'|`` at ``q_t`` (the solve is exact
    in float64; what is left is float32 round-off of an objective of size ~1e2 and of the
    args cast back); a wrong term or weight leaves O(1). The constants (the Gamma's
    concentration, the InverseGamma's rate) are not written. Exact scores: the closed form
    is the default for such a guide."""
    engine, problems = _problems(monkeypatch, _model, _guide, 5, trust_region=trust_region)
    assert engine.inner_solver == "closed_form" and all(p.solution is not None for p in problems)
    bound = []
    for problem in problems:
        assert set(problem.solution) == {"ab", "rate", "concentration", "loc", "scale"}
        fisher_t, _ = _gradients(engine, problem, problem.params_t)
        fisher, kl = _gradients(engine, problem, problem.solution)
        weight = float(-(fisher @ kl) / (kl @ kl))
        assert float((fisher + weight * kl).norm()) < 1e-3 * float(fisher_t.norm())
        power = math.log2(weight / engine.objective.prox_weight)
        if trust_region is None:
            assert abs(power) < 0.01
        else:
            assert abs(power - round(power)) < 0.01 and round(power) >= 0
            with torch.no_grad():
                travelled = engine.density.kl(problem.params_t, {**problem.params_t, **problem.solution})
            assert float(travelled) <= engine._budget(problem.active_dim) * (1 + 1e-5)
            bound.append(round(power) > 0)
    assert trust_region is None or any(bound)  # the budget bound some update


def test_with_a_subsampled_plate_the_weight_grows_with_the_updates(monkeypatch, fresh_pyro):
    """With a subsampled plate and the default weight each update's solution is stationary
    for ``F + w_t KL(q_t || q)`` at ``w_t = max(10, t)`` (read off the two gradients as
    above, to 1%: from update 11 on a constant weight 10 is off by 10% or more)."""
    engine, problems = _problems(monkeypatch, _subsampled_model, _beta_guide, 20, trust_region=None)
    assert engine.inner_solver == "closed_form" and len(problems) == 20
    for update, problem in enumerate(problems):
        fisher, kl = _gradients(engine, problem, problem.solution)
        weight = float(-(fisher @ kl) / (kl @ kl))
        assert abs(weight / max(10.0, update) - 1.0) < 0.01, (update, weight)


def _coin_model(data):
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("flips", len(data)):
        pyro.sample("obs", dist.Bernoulli(p), obs=data)


def _coin_guide(data):
    a = pyro.param("a", torch.tensor(5.0), constraint=constraints.positive)
    b = pyro.param("b", torch.tensor(5.0), constraint=constraints.positive)
    pyro.sample("p", dist.Beta(a, b))


def _rates_model(counts):
    rates = pyro.sample("rates", dist.Gamma(2.0 * torch.ones(3), 1.0).to_event(1))
    with pyro.plate("n", counts.shape[0]):
        pyro.sample("obs", dist.Poisson(rates).to_event(1), obs=counts)


def _rates_guide(counts):
    a = pyro.param("a", torch.full((3,), 5.0), constraint=constraints.positive)
    b = pyro.param("b", torch.full((3,), 5.0), constraint=constraints.positive)
    pyro.sample("rates", dist.Gamma(a, b).to_event(1))


@pytest.mark.parametrize("solver", ["closed_form", "optimizer"])
def test_conjugate_guides_reach_the_exact_posterior_at_a_small_learning_rate(solver, fresh_pyro):
    """A Beta guide of a coin's bias (2,000 flips) and a Gamma guide of three Poisson rates
    (500 counts each) contain their posteriors, whose scores are the guides' at the
    posterior's args: the Fisher term is zero there for any particles, so the posterior is
    the fixed point of every update. From ``a = b = 5`` (the coin's posterior sd is 30x
    smaller) with Adam(1e-3) and the defaults, the exact solve is there after 300 updates
    to float32 round-off of the solve's sums (1e-3 relative in the args; a wrong term moves
    the fixed point by far more); the optimizer's twenty Adam(1e-3) steps an update are
    not (each moves a log-arg by at most 0.02: the args have not yet reached 0.5 of the
    posterior's)."""
    generator = torch.Generator().manual_seed(0)
    flips = (torch.rand(2000, generator=generator) < 0.3).float()
    counts = torch.poisson(torch.tensor([1.0, 4.0, 20.0]).expand(500, 3), generator=generator)
    cases = [
        (_coin_model, _coin_guide, flips, torch.stack([2 + flips.sum(), 2 + (1 - flips).sum()])),
        (_rates_model, _rates_guide, counts, torch.stack([2 + counts.sum(0), torch.full((3,), 1.0 + 500)])),
    ]
    for model, guide, data, exact in cases:
        pyro.clear_param_store()
        engine = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), inner_solver=solver)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(300):
                engine.step(data)
        fitted = torch.stack([pyro.param("a").detach(), pyro.param("b").detach()])
        if solver == "closed_form":
            torch.testing.assert_close(fitted, exact, rtol=1e-3, atol=0)
        else:
            assert bool((fitted < 0.5 * exact).any())


def _shared_guide():
    """One param gives both of the Beta's args: not solvable coordinate by coordinate."""
    a = pyro.param("a", torch.tensor(3.0), constraint=constraints.positive)
    pyro.sample("p", dist.Beta(a, a))


def _shared_model():
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("flips", 10):
        pyro.sample("obs", dist.Bernoulli(p), obs=torch.tensor([1.0] * 5 + [0.0] * 5))


def _subsampled_model():
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    data = torch.tensor([1.0] * 60 + [0.0] * 40)
    with pyro.plate("flips", 100, subsample_size=20) as index:
        pyro.sample("obs", dist.Bernoulli(p), obs=data[index])


def _beta_guide():
    a = pyro.param("a", torch.tensor(3.0), constraint=constraints.positive)
    b = pyro.param("b", torch.tensor(3.0), constraint=constraints.positive)
    pyro.sample("p", dist.Beta(a, b))


def test_which_guides_and_settings_take_the_solve(monkeypatch, fresh_pyro):
    """The solve needs each free arg read from its own param entry: a param shared by two
    args takes the optimizer's steps (and the optimizer moves it); with a subsampled plate
    the solve is the default too, at the weight ``max(10, t)`` (a weight the user sets
    stays constant), and the optimizer's steps on request; a guide without linear scores
    is refused by name."""
    engine, problems = _problems(monkeypatch, _shared_model, _shared_guide, 3)
    assert engine.inner_solver == "closed_form" and all(p.solution is None for p in problems)
    assert float(pyro.param("a").detach()) != 3.0
    engine, problems = _problems(monkeypatch, _subsampled_model, _beta_guide, 2)
    assert engine.inner_solver == "closed_form" and all(p.solution is not None for p in problems)
    assert (engine.objective.prox_weight, engine.prox_weight_growth) == (10.0, 1.0)
    engine, _ = _problems(monkeypatch, _subsampled_model, _beta_guide, 1, prox_weight=50.0)
    assert (engine.objective.prox_weight, engine.prox_weight_growth) == (50.0, 0.0)
    engine, problems = _problems(monkeypatch, _subsampled_model, _beta_guide, 2, inner_solver="optimizer")
    assert engine.inner_solver == "optimizer" and all(p.solution is None for p in problems)

    def dirichlet_model():
        pyro.sample("p", dist.Dirichlet(torch.ones(3)))

    def dirichlet_guide():
        pyro.sample("p", dist.Dirichlet(pyro.param("c", torch.ones(3), constraint=constraints.positive)))

    with pytest.raises(ValueError, match="nor a mean-field guide with linear scores"):
        _problems(monkeypatch, dirichlet_model, dirichlet_guide, 1, inner_solver="closed_form")
