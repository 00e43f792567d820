"""The coarse location correction's algebra (:mod:`psvi.coarse`), backend-free (NumPy).

On a quadratic log joint ``log p(u) = -(u - m)' H (u - m) / 2`` the model scores are
``-H (u - m)``, so with particles whose deviations (in sds) have an exactly orthonormal
design over the ``S`` particles (``sum_s xi_s xi_s' = S I``) Stein's estimate of the
projected curvature is exact, not just unbiased: these checks hold to round-off.
"""

import numpy as np
import pytest

from psvi.coarse import (
    COARSE_KL,
    COARSE_STEP,
    CoarseStatistics,
    CoarseStep,
    coarse_estimate,
    coarse_layout,
    coarse_move,
    coarse_newton_step,
    fold_coarse_statistics,
    resolve_coarse,
)

# Two globals (coordinates 0 and 5), slot 0 (coordinates 1-3), slot 1 (coordinates 4, 6).
BLOCKS = np.array([0, 1, 1, 1, 2, 0, 2])


def _directions(loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(D, G + 2 n)``: each global by its sd, then each slot's shift (its members by
    their sds) and dilation (its members along their locations)."""
    layout = coarse_layout(BLOCKS)
    columns = [np.where(layout.global_of == g, scale, 0.0) for g in range(layout.num_globals)]
    columns += [np.where(layout.slot_of == k, scale, 0.0) for k in range(layout.num_slots)]
    columns += [np.where(layout.slot_of == k, loc, 0.0) for k in range(layout.num_slots)]
    return np.stack(columns, 1)


def _sum_by_slot(values: np.ndarray) -> np.ndarray:
    """NumPy's segment sum over each slot's coordinates, as the backends take theirs."""
    layout = coarse_layout(BLOCKS)
    return np.stack([values[:, layout.slot_of == k].sum(1) for k in range(layout.num_slots)], 1)


def _quadratic(seed: int = 0):
    rng = np.random.default_rng(seed)
    dim = BLOCKS.size
    root = rng.normal(size=(dim, dim))
    hessian = root @ root.T / dim + np.eye(dim)
    mode, loc, scale = rng.normal(size=dim), rng.normal(size=dim), rng.uniform(0.5, 2.0, dim)
    # 8 particles whose deviations in sds are 7 orthogonal +-1 columns (Hadamard, centred):
    # sum_s xi_s xi_s' = 8 I exactly.
    hadamard = np.array([[1.0]])
    while hadamard.shape[0] < 8:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    particles = loc + scale * hadamard[:, 1:]
    scores = -(particles - mode) @ hessian
    return hessian, mode, loc, scale, particles, scores


def test_the_layout_numbers_globals_and_slots():
    layout = coarse_layout(BLOCKS)
    np.testing.assert_array_equal(layout.global_coordinates, [0, 5])
    np.testing.assert_array_equal(layout.global_of, [0, 2, 2, 2, 2, 1, 2])
    np.testing.assert_array_equal(layout.slot_of, [2, 0, 0, 0, 1, 2, 1])
    assert (layout.num_globals, layout.num_slots) == (2, 2)
    assert coarse_layout(np.zeros(4, np.int64)) is None  # no local slot: nothing coarse
    assert coarse_layout(None) is None


def test_steins_estimate_is_the_projected_curvature_and_gradient_on_a_quadratic():
    hessian, mode, loc, scale, particles, scores = _quadratic()
    estimate = coarse_estimate(np, _sum_by_slot, coarse_layout(BLOCKS), loc, scale, particles, scores, None)
    directions = _directions(loc, scale)
    projected = directions.T @ hessian @ directions
    np.testing.assert_allclose(estimate.globals, np.diag(projected)[:2], rtol=1e-10)
    np.testing.assert_allclose(estimate.coupling, projected[:2, 2:], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(estimate.slots, projected[2:, 2:], rtol=1e-10, atol=1e-12)
    # The particles average to loc, so their mean score is the gradient there.
    gradient = -(loc - mode) @ hessian @ directions
    np.testing.assert_allclose(estimate.gradient_globals, gradient[:2], rtol=1e-10)
    np.testing.assert_allclose(estimate.gradient_slots, gradient[2:], rtol=1e-10)


def _averages(projected: np.ndarray, gradient: np.ndarray) -> CoarseStatistics:
    return CoarseStatistics(
        gradient[:2], gradient[2:], np.diag(projected)[:2], projected[:2, 2:], projected[2:, 2:], 0
    )


def test_the_newton_step_solves_the_coarse_system_of_the_strongly_coupled_globals():
    # Global 0 coupled to slot 0's shift at 0.9 (joins), global 1 at most 0.1 (does not).
    projected = np.eye(6)
    projected[0, 2] = projected[2, 0] = 0.9
    projected[1, 3:] = projected[3:, 1] = 0.1
    gradient = np.array([1.0, 2.0, 0.5, -1.0, 0.3, 0.2])
    step = coarse_newton_step(np, _averages(projected, gradient))
    kept = [0, 2, 3, 4, 5]  # the coarse system without global 1, its couplings dropped
    system = projected[np.ix_(kept, kept)]
    expected = np.linalg.solve(system, gradient[kept])
    np.testing.assert_allclose(step.globals, [expected[0], 0.0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(step.slots, expected[1:], rtol=1e-10)


def test_no_step_where_the_coarse_curvature_is_not_positive_definite():
    projected = np.eye(6)
    projected[0, 2] = projected[2, 0] = 1.5  # global 0 and slot 0: an indefinite pair
    step = coarse_newton_step(np, _averages(projected, np.ones(6)))
    assert not np.any(step.globals) and not np.any(step.slots)
    empty = _averages(np.zeros((6, 6)), np.zeros(6))  # nothing averaged yet
    step = coarse_newton_step(np, empty)
    assert not np.any(step.globals) and not np.any(step.slots)


def test_the_move_takes_its_fraction_of_the_step_within_the_kl_cap():
    layout = coarse_layout(BLOCKS)
    loc, scale = np.linspace(-1.0, 1.0, BLOCKS.size), np.full(BLOCKS.size, 0.5)
    step = CoarseStep(np.array([0.1, 0.0]), np.array([0.2, 0.0, 0.0, -0.1]))
    move = coarse_move(np, layout, loc, scale, step)
    expected = COARSE_STEP * (_directions(loc, scale) @ np.r_[step.globals, step.slots])
    np.testing.assert_allclose(move, expected, rtol=1e-12)
    far = coarse_move(np, layout, loc, scale, CoarseStep(1e4 * step.globals, 1e4 * step.slots))
    np.testing.assert_allclose(0.5 * np.mean((far / scale) ** 2), COARSE_KL, rtol=1e-10)
    np.testing.assert_allclose(far / np.linalg.norm(far), expected / np.linalg.norm(expected), rtol=1e-10)


def test_the_statistics_are_a_plain_mean_then_an_average_over_the_last_hundred():
    def filled(value: float) -> CoarseStatistics:
        shapes = ((1,), (2,), (1,), (1, 2), (2, 2))
        return CoarseStatistics(*(np.full(shape, value) for shape in shapes), None)

    folded = filled(0.0)._replace(updates=np.zeros(()))
    for value in (1.0, 2.0, 3.0):
        folded = fold_coarse_statistics(np, folded, filled(value))
    for part in folded[:5]:
        np.testing.assert_allclose(part, 2.0)  # the mean of 1, 2, 3
    late = folded._replace(updates=np.array(500.0))
    folded = fold_coarse_statistics(np, late, filled(102.0))
    for part in folded[:5]:
        np.testing.assert_allclose(part, 2.0 + (102.0 - 2.0) / 100)
    assert folded.updates == 501


def test_requesting_it_where_it_cannot_apply_is_refused_by_name():
    with pytest.raises(ValueError, match="coarse_correction=True .* local latents in a subsampled plate"):
        resolve_coarse(True, None)
    layout = coarse_layout(BLOCKS)
    assert resolve_coarse(True, layout) is layout
    assert resolve_coarse(False, layout) is None  # off by default
    assert resolve_coarse(False, None) is None
