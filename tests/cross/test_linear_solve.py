"""The exact inner solve of guides with linear scores agrees across backends: the same
statistics (Beta, Gamma and Normal coordinates, one Gamma arg a constant of the guide)
into ``pyro_psvi.objective.linear_score_solve`` (float64 inside) and
``numpyro_psvi.objective.linear_score_solve`` (float32) give the same args, without a
trust region and with one that binds (the ladder of weights picks the same one)."""

from functools import partial

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as ndist
import pyro.distributions as pdist
import pytest
import torch

from numpyro_psvi import guides as numpyro_guides
from numpyro_psvi.objective import linear_score_solve as numpyro_solve
from psvi.families import by_family
from pyro_psvi import guides as pyro_guides
from pyro_psvi.objective import linear_score_solve as pyro_solve

OWNER = np.array([0, 0, 1, 1, 2, 2])
ARGS_T = (np.array([8.0, 3.0, 4.0, 2.5, 0.3, -1.0]), np.array([5.0, 9.0, 2.0, 6.0, 0.8, 1.5]))
TARGET = (np.array([20.0, 6.0, 4.0, 7.0, 1.0, -0.2]), np.array([12.0, 15.0, 1.0, 3.0, 0.4, 0.6]))
FREE = (np.array([True, True, False, True, True, True]), np.ones(6, bool))  # the first Gamma's shape fixed


def _rules(backend: str) -> list:
    """The backend's Beta, Gamma and Normal rules (the coordinates' families, by OWNER)."""
    module, dist = (pyro_guides, pdist) if backend == "pyro" else (numpyro_guides, ndist)
    return [
        module._LINEAR_SCORES[key]
        for key in ((dist.Beta, "logit"), (dist.Gamma, "log"), (dist.Normal, "identity"))
    ]


def _statistics(backend: str, particles: np.ndarray, scores: np.ndarray):
    """The backend's LinearScoreStatistics of the coordinates above (its own rules)."""
    module = pyro_guides if backend == "pyro" else numpyro_guides
    families = _rules(backend)
    convert = (lambda x: torch.tensor(x, dtype=torch.float32)) if backend == "pyro" else jnp.float32
    phi_a, phi_b = np.zeros_like(particles), np.zeros_like(particles)
    for position, rule in enumerate(families):
        mine = OWNER == position
        one, two = rule.features(convert(particles))
        phi_a[:, mine], phi_b[:, mine] = np.asarray(one)[:, mine], np.asarray(two)[:, mine]
    sums = [
        np.sum(x, 0) for x in (phi_a * phi_a, phi_a * phi_b, phi_b * phi_b, phi_a * scores, phi_b * scores)
    ]
    owner = torch.tensor(OWNER) if backend == "pyro" else OWNER
    where = torch.where if backend == "pyro" else jnp.where
    per_family = partial(by_family, where, families, owner)
    variances = np.var(particles, 0) + 0.1
    fields = {
        "args_t": tuple(map(convert, ARGS_T)), "sums": tuple(map(convert, sums)), "count": len(particles),
        "variances": convert(variances), "natural": partial(per_family, "natural"),
        "log_partition": partial(per_family, "log_partition"),
        "log_partition_derivatives": partial(per_family, "log_partition_derivatives"),
        "from_natural": partial(per_family, "from_natural"),
        "free": tuple(torch.tensor(mask) for mask in FREE) if backend == "pyro" else FREE, "write": None,
    }  # fmt: skip
    if backend == "pyro":
        fields.update(kl_gradient=None, natural_pullback=None)
    return module.LinearScoreStatistics(**fields)


@pytest.mark.parametrize(
    "max_kl, target_scale",
    [(None, 1.0), (0.05, 1.0), (None, 5.0)],
    ids=["no trust region", "a binding trust region", "a far target"],
)
def test_pyro_and_numpyro_solve_the_same_problem_alike(max_kl, target_scale, monkeypatch):
    """Particles of ``q_t`` and the scores of a target of the same families (plus noise):
    the two solutions agree to 2e-3 relative (float32 round-off of sums of size ~100 in
    NumPyro's solve); with the budget they are within it and differ from the unbounded
    solution (it binds). With the target's args five times as large, whole Newton steps
    do not decrease every entry and both line searches run: with the whole step as the
    only fraction NumPyro's solve ends elsewhere."""
    rng = np.random.default_rng(0)
    particles = rng.normal(0.0, 0.5, (8, 6)) + np.array([0.4, 0.4, 0.7, -0.9, 0.3, -0.7])
    scores = np.zeros_like(particles)
    for position, rule in enumerate(_rules("pyro")):
        mine = OWNER == position
        natural = rule.natural or (lambda a, b: (a, b))
        e_1, e_2 = natural(*(torch.tensor(side[mine] * target_scale) for side in TARGET))
        one, two = rule.features(torch.tensor(particles[:, mine]))
        scores[:, mine] = (e_1 * one + e_2 * two).numpy()
    scores = scores + rng.normal(0.0, 0.3, scores.shape)
    pyro_stats, numpyro_stats = (
        _statistics("pyro", particles, scores),
        _statistics("numpyro", particles, scores),
    )
    got_pyro = pyro_solve(pyro_stats, 10.0, "covariance", float("inf") if max_kl is None else max_kl)
    got_numpyro = numpyro_solve(numpyro_stats, 10.0, "covariance", max_kl)
    for mine, theirs in zip(got_pyro, got_numpyro, strict=True):
        np.testing.assert_allclose(np.asarray(theirs), mine.numpy(), rtol=2e-3, atol=2e-4)
    assert np.allclose(got_pyro[0][2].item(), ARGS_T[0][2])  # the constant stays
    if max_kl is not None:
        unbounded = pyro_solve(pyro_stats, 10.0, "covariance")
        assert not np.allclose(unbounded[0].numpy(), got_pyro[0].numpy(), rtol=1e-2)
    if target_scale != 1.0:
        monkeypatch.setattr("numpyro_psvi.objective.LINEAR_SOLVE_FRACTIONS", (1.0,))
        whole_steps = numpyro_solve(numpyro_stats, 10.0, "covariance", max_kl)
        assert not all(np.allclose(a, b, rtol=1e-3) for a, b in zip(whole_steps, got_numpyro, strict=True))
