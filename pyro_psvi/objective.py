"""The proximal score-matching objective (docs/algorithm.md, section 2).

For particles ``u_s ~ q_t`` with model scores ``g_s``::

    L_t(lam) = (1/S) sum_s r_s' W_t r_s + prox_weight * KL(q_t || q_lam),
    r_s = grad_u log q_lam(u_s) - g_s,

with ``W_t = Cov(q_t)`` (``weighting="covariance"``) or ``I``
(``weighting="identity"``); ``prox_weight`` is the paper's ``1/eta``.

For a diagonal Gaussian guide the Fisher term splits over coordinates, and each
coordinate needs the particles only through five sums over them
(:class:`FisherStatistics`): computed once per step, they make each of the ``K``
inner steps cost ``O(D)`` instead of ``O(S D)`` plus an autograd pass over ``(S, D)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from psvi.coarse import CoarseLayout, CoarseStatistics, coarse_estimate
from psvi.objective import (
    LINEAR_SOLVE_FRACTIONS,
    LINEAR_SOLVE_ITERATIONS,
    LINEAR_SOLVE_WEIGHTS,
    LOWRANK_AXIS_STEP,
    LOWRANK_DIAG_FLOOR,
    SMALLEST_STEP_FRACTION,
    TRANSPORT_FISHER_WEIGHT,
    TransportPath,
    diagonal_step_path,
    fisher_fade,
    linear_newton_step,
    linear_solve_tolerance,
    linear_solve_value,
    path_elbo_weight,
)
from pyro_psvi.guides import GuideDensity, LinearScoreStatistics, Params


def weighted_fisher(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: torch.Tensor,
    model_scores: torch.Tensor,
    weighting: str,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over particles of ``r' W_t r`` with ``r = grad log q_params - g``.

    Parameters
    ----------
    density : GuideDensity
    params, params_t : dict
        Constrained guide params being fitted, and those the particles came from
        (the latter define ``W_t``; pass them detached).
    particles, model_scores : torch.Tensor
        Shape ``(S, D)`` each.
    weighting : {"covariance", "identity"}
    weights : torch.Tensor, optional
        ``(D,)`` per-coordinate weights of a mini-batch of local latents
        (:class:`pyro_psvi.scores.ModelScores`): the sum becomes ``sum_d weights_d
        (...)_d``, unbiased for the full sum. Only for a diagonal ``W_t`` (AutoNormal).
    """
    residuals = density.score(params, particles) - model_scores
    return residual_fisher(density, params_t, residuals, weighting, weights)


def residual_fisher(
    density: GuideDensity,
    params_t: Params,
    residuals: torch.Tensor,
    weighting: str,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`weighted_fisher` from its ``(S, D)`` residuals ``grad log q - g``."""
    if weights is not None:
        residuals = residuals * weights.sqrt()
    if weighting == "covariance":
        return density.cov_quad(params_t, residuals).mean()
    return residuals.pow(2).sum(-1).mean()


def elbo_terms(
    density: GuideDensity,
    params: Params,
    particles: torch.Tensor,
    log_joints: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``(S,)`` terms ``log p(u_s) - log q(u_s)`` whose mean is the ELBO estimate
    ``Trace_ELBO`` reports with ``S`` particles, from a step's own particles and log
    joints (no score call); their sd over ``sqrt(S)`` is its standard error (0 when ``q``
    is the posterior: every term is then ``log p(x)``).

    Parameters
    ----------
    density : GuideDensity
    params : dict
        Constrained guide params the particles came from.
    particles, log_joints : torch.Tensor
        ``(S, D)`` flat unconstrained particles and their ``(S,)`` log joints (the
        mini-batch's scaled by ``N/B`` by the plate, ``log|det J|`` included).
    weights : torch.Tensor, optional
        ``(D,)`` coordinate weights of local latents: ``log q`` counts the global
        coordinates and, times ``N/B``, the mini-batch's local ones, as the log joint
        counts their priors (the others are in neither): unbiased for the ELBO
        (``density.elbo_log_prob``).
    """
    with torch.no_grad():
        if weights is None:
            log_q = density.log_prob(params, particles)
        else:
            log_q = density.elbo_log_prob(params, particles, weights)
        return log_joints - log_q


def negative_elbo(
    density: GuideDensity,
    params: Params,
    particles: torch.Tensor,
    log_joints: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``-(1/S) sum_s [log p(u_s) - log q(u_s)]``: the loss ``Trace_ELBO`` reports with
    ``S`` particles (:func:`elbo_terms`, the same arguments)."""
    return -elbo_terms(density, params, particles, log_joints, weights).mean()


class FisherStatistics(NamedTuple):
    """Per-coordinate sums over ``S`` particles ``u_s`` with model scores ``g_s``, the
    particles centred at the step's guide location ``loc_t`` (``v_s = u_s - loc_t``, so
    that no sum cancels as the location moves): each ``(D,)``."""

    count: int
    offset: torch.Tensor  # sum_s v_s
    offset_sq: torch.Tensor  # sum_s v_s^2
    cross: torch.Tensor  # sum_s v_s g_s
    score: torch.Tensor  # sum_s g_s
    score_sq: torch.Tensor  # sum_s g_s^2


def fisher_statistics(
    density: GuideDensity, params_t: Params, particles: torch.Tensor, model_scores: torch.Tensor
) -> FisherStatistics | None:
    """The :class:`FisherStatistics` of a step, or ``None`` when the guide is not a
    diagonal Gaussian with closed-form scores (``density.loc_scale`` is ``None``)."""
    if density.loc_scale is None:
        return None
    with torch.no_grad():  # (S, D) temporaries squared in place: at large D, fewer allocations
        offsets = particles - density.loc_scale(params_t)[0]
        offset, cross = offsets.sum(0), (offsets * model_scores).sum(0)
        return FisherStatistics(
            count=particles.shape[0],
            offset=offset,
            offset_sq=offsets.square_().sum(0),
            cross=cross,
            score=model_scores.sum(0),
            score_sq=model_scores.square().sum(0),
        )


def diagonal_weighted_fisher(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    stats: FisherStatistics,
    weighting: str,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`weighted_fisher` of a diagonal Gaussian guide from the step's statistics.

    With ``r = -(u - loc) / scale^2 - g`` and ``u - loc = v - delta``,
    ``delta = loc - loc_t``: ``sum_s r^2 = sum_s (v - delta)^2 / scale^4
    + 2 sum_s (v - delta) g / scale^2 + sum_s g^2``, each sum from the statistics.
    """
    loc, scale = density.loc_scale(params)
    loc_t, scale_t = density.loc_scale(params_t)
    delta = loc - loc_t
    centred_sq = stats.offset_sq - 2 * delta * stats.offset + stats.count * delta**2
    centred_cross = stats.cross - delta * stats.score
    precision = scale.pow(-2)
    per_coordinate = precision**2 * centred_sq + 2 * precision * centred_cross + stats.score_sq
    if weighting == "covariance":
        per_coordinate = per_coordinate * scale_t**2
    if weights is not None:
        per_coordinate = per_coordinate * weights
    return per_coordinate.sum() / stats.count


class CurvatureStatistics(NamedTuple):
    """Per-coordinate spread of the particles and its covariance with the scores, in
    units of ``q_t``'s variance, each ``(D,)``: ``spread = sum_s (v_s - v_bar)^2 /
    sigma_t^2`` and ``cross = -sum_s (v_s - v_bar)(g_s - g_bar) / sigma_t^2`` (centred at
    the particle means; uncentred with one particle). ``cross / spread`` is the
    least-squares slope of ``-g`` on ``u``: the curvature of the model's log joint,
    exact on a separable quadratic one (Stein's identity makes ``E[cross]`` the expected
    curvature times ``E[spread]`` on any). A shift common to every particle's score (the
    mini-batch's gradient noise) drops out of both."""

    spread: torch.Tensor
    cross: torch.Tensor


def curvature_statistics(stats: FisherStatistics, scale_t: torch.Tensor) -> CurvatureStatistics:
    """The :class:`CurvatureStatistics` of a step from its :class:`FisherStatistics`."""
    spread, cross = stats.offset_sq, stats.cross
    if stats.count > 1:
        spread = spread - stats.offset**2 / stats.count
        cross = cross - stats.offset * stats.score / stats.count
    variance = scale_t**2
    return CurvatureStatistics(spread / variance, -cross / variance)


def split_diagonal_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    stats: FisherStatistics,
    curvature: CurvatureStatistics,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The split proximal objective of a diagonal Gaussian guide (docs/algorithm.md);
    ``params_t`` detached; ``options``: ``prox_weight``, ``weighting`` and ``weights``
    of :func:`split_diagonal_problem`, which builds it once for the K inner steps.

    The Fisher term ``(1/S) sum_s r_s^2`` is the residuals' spread around their mean
    plus the mean residual squared. The spread depends on the precision ``p`` alone:
    ``(1/S) sum_s ((v_s - v_bar) p + g_s - g_bar)^2 = (sigma_t^2 / S) spread
    (p - cross / spread)^2 + const``, here with the :class:`CurvatureStatistics`
    ``curvature`` that the engine averages over steps. The mean residual fits the
    location with ``p`` held fixed, and the KL's location part ``p delta^2 / 2`` holds
    ``p`` fixed too, so that a location held back by the proximal term cannot bias the
    precision. With this step's statistics and exact scores, the fixed points are those
    of :func:`proximal_objective` wherever the averaged curvature is positive; elsewhere
    the spread term holds ``p`` at ``p_t``.
    """
    return split_diagonal_problem(density, params_t, stats, curvature, **options).objective(params)


class SplitDiagonalProblem(NamedTuple):
    """:func:`split_diagonal_objective` of one step, with what depends only on ``q_t`` and
    the step's statistics computed once for the K inner steps.

    Attributes
    ----------
    objective : callable
        ``objective(params) -> (value, {"fisher", "kl"})`` at constrained params,
        differentiable.
    gradient : callable
        ``gradient(loc, scale) -> (d/d loc, d/d scale)``: the objective's gradient in the
        guide's flat location and scale, in closed form (elementwise, no autograd pass).
    """

    objective: Callable[[Params], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    gradient: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def coarse_statistics(
    layout: CoarseLayout,
    loc_t: torch.Tensor,
    scale_t: torch.Tensor,
    particles: torch.Tensor,
    model_scores: torch.Tensor,
    weights: torch.Tensor | None,
) -> CoarseStatistics:
    """One step's :func:`psvi.coarse.coarse_estimate` (its sums over each slot by
    ``index_add_``); ``layout``'s index arrays as tensors on the particles' device."""

    def sum_by_slot(values: torch.Tensor) -> torch.Tensor:
        sums = values.new_zeros(values.shape[0], layout.num_slots + 1)
        return sums.index_add_(1, layout.slot_of, values)[:, :-1]

    with torch.no_grad():
        return coarse_estimate(torch, sum_by_slot, layout, loc_t, scale_t, particles, model_scores, weights)


def split_diagonal_problem(
    density: GuideDensity,
    params_t: Params,
    stats: FisherStatistics,
    curvature: CurvatureStatistics,
    *,
    prox_weight: float,
    weighting: str,
    weights: torch.Tensor | None = None,
    objective_scale: float = 1.0,
) -> SplitDiagonalProblem:
    """:func:`split_diagonal_objective` times ``objective_scale`` (the inner steps':
    :func:`psvi.objective.inner_objective_scale`) and its gradient as functions of the
    guide's params (:class:`SplitDiagonalProblem`); the terms it reports are unscaled."""
    loc_t, scale_t = density.loc_scale(params_t)
    variance_t = scale_t**2
    # The target p* / p_t of the precision; where the averaged curvature is not positive
    # (noise, or a non-concave direction such as a ReLU kink) it says nothing, and the
    # precision stays where the proximal term holds it (docs/minibatch.md, section 7).
    informative = (curvature.spread > 0) & (curvature.cross > 0)
    slope = curvature.cross / torch.where(informative, curvature.spread, 1.0)
    target = torch.where(informative, slope * variance_t, 1.0)
    spread_weight = curvature.spread / stats.count
    offset_mean, score_mean = stats.offset / stats.count, stats.score / stats.count

    def objective(params: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loc, scale = density.loc_scale(params)
        held = scale.pow(-2).detach()
        ratio = (scale_t / scale) ** 2  # p / p_t
        spread = spread_weight * (ratio - target) ** 2 / variance_t
        delta = loc - loc_t
        mean_residual = (delta - offset_mean) * held - score_mean
        per_coordinate = spread + mean_residual**2
        if weighting == "covariance":
            per_coordinate = per_coordinate * variance_t
        if weights is not None:
            per_coordinate = per_coordinate * weights
        fisher = per_coordinate.sum()
        kl = 0.5 * (ratio - 1.0 - ratio.log() + held * delta**2).sum()
        return objective_scale * (fisher + prox_weight * kl), {"fisher": fisher, "kl": kl}

    # The gradient's constants. With c the coordinate weight, p = scale^-2 held fixed and
    # r the mean residual: d/d loc = (2 c r + prox_weight delta) p; through the ratio
    # p / p_t = ratio, d/d scale = d/d ratio * (-2 ratio / scale) with d/d ratio =
    # 2 c spread_weight (ratio - target) / sigma_t^2 + prox_weight (1 - 1 / ratio) / 2;
    # all times objective_scale, folded into the constants.
    coordinate_weight = variance_t if weighting == "covariance" else torch.ones_like(variance_t)
    if weights is not None:
        coordinate_weight = coordinate_weight * weights
    residual_coefficient = (2.0 * objective_scale) * coordinate_weight
    excess_coefficient = (-4.0 * objective_scale) * coordinate_weight * spread_weight / variance_t
    scaled_prox_weight = objective_scale * prox_weight

    def gradient(loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Each op one pass over D, in place where the operand is a temporary.
        held = scale.pow(-2)
        ratio = variance_t * held
        delta = loc - loc_t
        residual = (delta - offset_mean).mul_(held).sub_(score_mean)
        loc_grad = residual.mul_(residual_coefficient).add_(delta, alpha=scaled_prox_weight).mul_(held)
        scale_grad = (ratio - target).mul_(excess_coefficient).mul_(ratio)
        scale_grad = scale_grad.sub_(ratio.sub_(1.0), alpha=scaled_prox_weight).div_(scale)
        return loc_grad, scale_grad

    return SplitDiagonalProblem(objective, gradient)


def split_full_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: torch.Tensor,
    model_scores: torch.Tensor,
    *,
    prox_weight: float,
    weighting: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The split proximal objective of a full-covariance Gaussian guide
    (:func:`split_diagonal_objective` with a precision matrix; docs/algorithm.md);
    ``params_t``, ``particles`` and ``model_scores`` detached.

    With ``v_s = u_s - loc_t``, ``delta = loc - loc_t`` and precision ``P``, the residual
    is ``r_s = -P (v_s - delta) - g_s``. Its spread around the particles' mean,
    ``-P (v_s - v_bar) - (g_s - g_bar)``, depends on ``P`` alone, and a shift common to
    every particle's score (the mini-batch's gradient noise) drops out of it; the mean
    residual ``-P (v_bar - delta) - g_bar`` fits the location with ``P`` held fixed, as
    does the KL's location part ``delta' P delta / 2``. The value equals
    :func:`proximal_objective`'s; only the gradient in ``P`` differs. One particle has no
    spread, so the engine keeps the coupled objective then
    (:func:`psvi.objective.splits_full_covariance`).
    """
    loc, tril = density.loc_tril(params)
    loc_t, tril_t = density.loc_tril(params_t)
    eye = torch.eye(loc.shape[0], dtype=loc.dtype, device=loc.device)
    tril_inv = torch.linalg.solve_triangular(tril, eye, upper=False)
    precision = tril_inv.mT @ tril_inv
    held = precision.detach()
    offsets = particles - loc_t
    offset_mean, score_mean = offsets.mean(0), model_scores.mean(0)
    delta = loc - loc_t
    mean_residual = (offset_mean - delta) @ held + score_mean
    spread = (offsets - offset_mean) @ precision + (model_scores - score_mean)
    residuals = torch.cat([spread, mean_residual.unsqueeze(0)])
    if weighting == "covariance":
        residuals = residuals @ tril_t
    squares = residuals.pow(2).sum(-1)
    fisher = squares[:-1].mean() + squares[-1]
    # KL(q_t || q) with P held in its location term delta' P delta / 2 (same value).
    kl = density.kl(params_t, params) + 0.5 * delta @ (held - precision) @ delta
    return fisher + prox_weight * kl, {"fisher": fisher, "kl": kl}


def proximal_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: torch.Tensor | None,
    model_scores: torch.Tensor | None,
    *,
    prox_weight: float,
    weighting: str,
    weights: torch.Tensor | None = None,
    kl_seed: int | None = None,
    stats: FisherStatistics | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_t(params)`` and its two terms (``fisher``, ``kl``); ``params_t`` detached.
    ``weights``: see :func:`weighted_fisher`; ``kl_seed``: see ``GuideDensity.kl``;
    ``stats`` (:func:`fisher_statistics`), when given, replace ``particles`` and
    ``model_scores`` (the same value, in ``O(D)``)."""
    if stats is not None:
        fisher = diagonal_weighted_fisher(density, params, params_t, stats, weighting, weights)
    else:
        fisher = weighted_fisher(density, params, params_t, particles, model_scores, weighting, weights)
    kl = density.kl(params_t, params, kl_seed)
    return fisher + prox_weight * kl, {"fisher": fisher, "kl": kl}


def linear_score_gradient(
    stats: LinearScoreStatistics, prox_weight: float, weighting: str, objective_scale: float
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The gradient in a guide's flat args ``(a, b)`` of :func:`proximal_objective` times
    ``objective_scale``, for a guide with linear scores (:attr:`GuideDensity.linear_scores`):
    with ``(e_1, e_2)`` the functions of the args the scores are linear in, the residual
    ``r_s = e_1 phi_1(u_s) + e_2 phi_2(u_s) - g_s`` and the weight ``w`` of each coordinate
    (``q_t``'s variance, or 1), ``d/de_1 (1/S) sum_s w r_s^2 = (2 w / S) (e_1 S_11 + e_2
    S_12 - S_1g)``, likewise in ``e_2``, taken to the args, plus ``prox_weight`` times the
    KL's gradient. ``O(D)`` per call, no autograd pass and no run of the guide."""
    s_11, s_12, s_22, s_1g, s_2g = stats.sums
    weight = stats.variances if weighting == "covariance" else torch.ones_like(stats.variances)
    fisher_scale = 2.0 * objective_scale / stats.count * weight
    kl_scale = objective_scale * prox_weight

    def gradient(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e_1, e_2 = stats.natural(a, b)
        grad_1 = fisher_scale * (e_1 * s_11 + e_2 * s_12 - s_1g)
        grad_2 = fisher_scale * (e_1 * s_12 + e_2 * s_22 - s_2g)
        grad_a, grad_b = stats.natural_pullback(a, b, grad_1, grad_2)
        kl_a, kl_b = stats.kl_gradient(a, b)
        return grad_a + kl_scale * kl_a, grad_b + kl_scale * kl_b

    return gradient


def _negligible(e_1: torch.Tensor, e_2: torch.Tensor, move_1: torch.Tensor, move_2: torch.Tensor) -> bool:
    """Whether the move ``(move_1, move_2)`` from ``(e_1, e_2)`` is below
    :func:`psvi.objective.linear_solve_tolerance` of it in every coordinate (the exact
    solve's stop; a host read)."""
    relative = linear_solve_tolerance(torch.finfo(e_1.dtype).eps)
    tolerance = relative * (1 + torch.maximum(e_1.abs(), e_2.abs()))
    return bool((move_1.abs() <= tolerance).all() and (move_2.abs() <= tolerance).all())


def linear_score_solve(
    stats: LinearScoreStatistics,
    prox_weight: float,
    weighting: str,
    max_kl: float = math.inf,
    iterations: int = LINEAR_SOLVE_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat args ``(a, b)`` that minimize :func:`proximal_objective` for a guide with
    linear scores (:attr:`GuideDensity.linear_scores`), solved exactly, whatever the
    optimizer: with ``e = natural(a, b)`` the Fisher term is quadratic in ``e`` (the sums of
    :class:`LinearScoreStatistics`) and ``KL(q_t || q) = A(e) - A(e_t) - grad A(e_t) . (e -
    e_t)`` (``A`` the family's log-partition, :class:`~pyro_psvi.guides.LinearScoreRule`) is
    convex, so the problem separates into one convex problem in two unknowns per
    coordinate (one where the other arg is a constant of the guide).

    With a finite ``max_kl`` (the trust region's budget) the solution is that of the
    smallest weight ``prox_weight * 2^k`` whose ``KL(q_t || q)`` is within it (the largest
    tried where none is): the trust region solved in the KL's own geometry, where a
    fraction of the way to a far solution in the params (a line in ``(log a, log b)``)
    narrows the guide before it moves it. Newton's method from ``e_t`` with a backtracking
    (Armijo) line search over fixed fractions, all coordinates and weights at once, in
    float64 (``A`` at large args cancels in float32); a coordinate whose line search finds
    no decrease stays (a whole step predicted to decrease it by less than round-off is
    taken, as in float32 NumPyro). ``O(D)`` per iteration and weight."""
    dtype = stats.args_t[0].dtype
    wide = torch.float64 if stats.args_t[0].device.type != "mps" else dtype
    sums = tuple(total.to(wide) for total in stats.sums)
    variances = stats.variances.to(wide)
    fisher = (variances if weighting == "covariance" else torch.ones_like(variances)) / stats.count
    free_1, free_2 = stats.free
    e_t1, e_t2 = (part.to(wide) for part in stats.natural(*stats.args_t))
    grad_t1, grad_t2, *_ = stats.log_partition_derivatives(e_t1, e_t2)
    fractions = torch.tensor(LINEAR_SOLVE_FRACTIONS, dtype=wide, device=e_t1.device).view(-1, 1, 1)
    round_off = 100 * torch.finfo(wide).eps
    on_cpu = e_t1.device.type == "cpu"

    def kl(x_1: torch.Tensor, x_2: torch.Tensor) -> torch.Tensor:
        return stats.log_partition(x_1, x_2) - grad_t1 * x_1 - grad_t2 * x_2  # + a constant

    def decreasing(value, trials, point, step, current, slope) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``value`` at each of ``trials`` (F, 1, 1) of the ``step`` from ``point`` and
        whether it decreases each entry by Armijo's rule (the whole step, the first trial,
        also where its predicted decrease ``-slope`` is below the value's round-off)."""
        tried = value(point[0] + trials * step[0], point[1] + trials * step[1])
        decreases = (tried <= current + 1e-4 * trials * slope) & (slope < 0)
        decreases[0] |= (-slope <= round_off * (1 + current.abs())) & torch.isfinite(tried[0])
        return tried, decreases

    def solve(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The solutions (K, D) at the (K, 1) weights."""

        def value(x_1: torch.Tensor, x_2: torch.Tensor) -> torch.Tensor:
            return linear_solve_value(torch, sums, fisher, weight, (x_1, x_2), kl(x_1, x_2))

        e_1, e_2 = e_t1.expand(weight.shape[0], -1), e_t2.expand(weight.shape[0], -1)
        current = value(e_1, e_2)
        for _ in range(iterations):
            derivatives = stats.log_partition_derivatives(e_1, e_2)
            step_1, step_2, slope = linear_newton_step(
                torch, sums, fisher, weight, (e_1, e_2), (grad_t1, grad_t2), derivatives, (free_1, free_2)
            )
            if on_cpu and _negligible(e_1, e_2, step_1, step_2):  # converged: no line search
                break
            # On a CPU the whole step first (Newton's near the solution), the fractions
            # where it does not decrease every coordinate; elsewhere all at once.
            point, step = (e_1, e_2), (step_1, step_2)
            tried, decreases = decreasing(value, fractions[:1], point, step, current, slope)
            if not (on_cpu and bool(decreases.all())):
                tried, decreases = decreasing(value, fractions, point, step, current, slope)
            first = decreases.to(torch.int8).argmax(0, keepdim=True)  # the largest that decreases
            found = decreases.any(0)
            fraction = torch.where(found, fractions.view(-1)[first.squeeze(0)], 0.0)
            moved_1, moved_2 = fraction * step_1, fraction * step_2
            e_1, e_2 = e_1 + moved_1, e_2 + moved_2
            current = torch.where(found, tried.gather(0, first).squeeze(0), current)
            if on_cpu and _negligible(e_1, e_2, moved_1, moved_2):  # read at once on a CPU only
                break
        return e_1, e_2

    def travelled(e_1: torch.Tensor, e_2: torch.Tensor) -> torch.Tensor:
        """``KL(q_t || q)`` of each row's solution."""
        return (kl(e_1, e_2) - kl(e_t1, e_t2)).sum(-1)

    def args(e_1: torch.Tensor, e_2: torch.Tensor, row: torch.Tensor | int) -> tuple[torch.Tensor, ...]:
        return tuple(part[row].to(dtype) for part in stats.from_natural(e_1, e_2))

    # On a CPU the update's weight first: near the posterior its solution is in the trust
    # region; the ladder of weights where it is not (elsewhere the ladder at once).
    weights = torch.tensor(LINEAR_SOLVE_WEIGHTS, dtype=wide, device=e_t1.device).unsqueeze(-1)
    if on_cpu or not math.isfinite(max_kl):
        e_1, e_2 = solve(prox_weight * weights[:1])
        if not math.isfinite(max_kl) or bool(travelled(e_1, e_2) <= max_kl):
            return args(e_1, e_2, 0)
    e_1, e_2 = solve(prox_weight * weights)
    within = travelled(e_1, e_2) <= max_kl
    return args(e_1, e_2, torch.where(within.any(), within.to(torch.int8).argmax(), weights.shape[0] - 1))


def transport_path(
    density: GuideDensity,
    params_t: Params,
    particles: torch.Tensor,
    residuals_t: torch.Tensor,
    fisher_t: torch.Tensor,
) -> TransportPath:
    """The :class:`~psvi.objective.TransportPath` of a step of a flow guide (``density.transport``);
    ``residuals_t`` and ``fisher_t``: the residuals ``grad log q_t - g`` at the particles
    and the Fisher term at ``params_t`` (:func:`residual_fisher`; detached params)."""
    with torch.no_grad():
        base = density.transport.pull(params_t, particles)
        weight = path_elbo_weight(fisher_t, density.latent_dim)
        fade = fisher_fade(fisher_t, density.latent_dim)
    return TransportPath(base, -residuals_t.detach(), weight, fade)


def transport_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: torch.Tensor,
    model_scores: torch.Tensor,
    path: TransportPath,
    *,
    prox_weight: float,
    weighting: str,
    kl_seed: int | None = None,
    fisher_weight: float = TRANSPORT_FISHER_WEIGHT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A flow guide's ``L_t(params)`` (:func:`psvi.objective.path_elbo_weight`): the
    Fisher term, the map's displacement (``density.kl``) and the path ``-ELBO``
    linearized at ``q_t`` (``path``: :func:`transport_path`); ``params_t`` detached; the
    terms as auxiliary output (``kl``, ``path_elbo``, and ``fisher`` unless
    ``fisher_weight`` is 0: :func:`psvi.objective.transport_fisher_weight`)."""
    # The Fisher term first (``None`` at weight 0): the order of the operations sets the
    # updates' round-off, which a flow's fit carries far.
    fisher = None
    if fisher_weight:
        fisher = weighted_fisher(density, params, params_t, particles, model_scores, weighting)
    kl = density.kl(params_t, params, kl_seed)
    moved = density.transport.push(params, path.base) - particles
    path_elbo = -(path.residuals * moved).sum(-1).mean()
    if fisher is None:  # ``fisher_weight`` 0: no second derivatives of the flow
        return prox_weight * kl + path.weight * path_elbo, {"kl": kl, "path_elbo": path_elbo}
    value = fisher_weight * path.fisher_scale * fisher + prox_weight * kl + path.weight * path_elbo
    return value, {"fisher": fisher, "kl": kl, "path_elbo": path_elbo}


def trust_region_fraction(
    kl_at: Callable[[float], torch.Tensor], max_kl: float, max_halvings: int, *, lazy: bool
) -> torch.Tensor:
    """Largest ``frac`` in ``{1, 1/2, ..., 2^-max_halvings}`` with ``kl_at(frac) <= max_kl``.

    ``frac`` is 0 (reject the step) when no fraction qualifies or the KL is not
    finite. With ``lazy=True`` the fractions are tried in turn, reading each KL on
    the host (cheap on a CPU, where most steps need one KL); with ``lazy=False`` all
    are evaluated and the choice is made on the device, with no host synchronisation.
    """
    fracs = [2.0**-i for i in range(max_halvings + 1)]
    if lazy:
        for frac in fracs:
            kl = kl_at(frac)
            if bool(torch.isfinite(kl) & (kl <= max_kl)):
                return torch.tensor(frac, dtype=kl.dtype)
        return torch.zeros((), dtype=kl.dtype)
    kls = torch.stack([kl_at(frac) for frac in fracs])
    ok = torch.isfinite(kls) & (kls <= max_kl)
    fracs = torch.tensor(fracs, dtype=kls.dtype, device=kls.device)
    return torch.where(ok, fracs, torch.zeros_like(fracs)).max()


class GaussianStep(NamedTuple):
    """A Gaussian guide's proximal step solved in closed form
    (:func:`gaussian_proximal_step`, :func:`lowrank_proximal_step`,
    :func:`diagonal_proximal_step`): the new ``loc`` and ``scale`` (the Cholesky factor
    of a full covariance, the pair ``(cov_factor, scale)`` of a low-rank one, the sds of
    a diagonal one), and the fraction of the solved step taken (0: no fraction kept the
    KL finite and in budget)."""

    loc: torch.Tensor
    scale: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    frac: torch.Tensor


def largest_step_fraction(
    kl_at: Callable[[torch.Tensor], torch.Tensor], max_kl: float, like: torch.Tensor, num_bisections: int
) -> torch.Tensor:
    """The twin of :func:`numpyro_psvi.objective.largest_step_fraction` (0-dim, the dtype
    and device of ``like``). No host sync off a CPU: the bisection runs on the device;
    on a CPU, where reading it costs nothing, a whole step that fits skips the search."""
    one = torch.ones((), dtype=like.dtype, device=like.device)
    whole_fits = kl_at(one) <= max_kl
    low, high = one * SMALLEST_STEP_FRACTION, one
    found = kl_at(low) <= max_kl  # whether ``low`` was seen to fit (no second evaluation)
    if like.device.type != "cpu" or not whole_fits:
        for _ in range(num_bisections):
            mid = low * torch.sqrt(high / low)  # low * high underflows
            fits = kl_at(mid) <= max_kl
            low, high, found = torch.where(fits, mid, low), torch.where(fits, high, mid), found | fits
    return torch.where(whole_fits, one, torch.where(found, low, 0.0 * one))


class WhitenedStep(NamedTuple):
    """The twin of :class:`numpyro_psvi.objective.WhitenedStep`."""

    basis: torch.Tensor
    cov_change: torch.Tensor
    shift: torch.Tensor
    frac: torch.Tensor


def whitened_proximal_step(
    z: torch.Tensor, g: torch.Tensor, prox_weight: float, max_kl: float, num_bisections: int = 40
) -> WhitenedStep:
    """The split proximal objective of a Gaussian guide with covariance weighting, solved
    in closed form in ``q_t``'s whitened coordinates: the twin of
    :func:`numpyro_psvi.objective.whitened_proximal_step`, whose docstring has the
    derivation (docs/algorithm.md). No host sync off a CPU: the bisection runs on the device.
    A singular or non-finite system gives non-finite values (as in JAX), not an error."""
    num, dim = z.shape
    z_bar, g_bar = z.mean(0), g.mean(0)
    z_spread = z - z_bar
    r_spread = (g - g_bar) + z_spread  # the residuals' spread under q_t (E = 0)
    k = min(num - 1, dim)
    # As the twin: an SVD (of zeros where z is not finite, on which it raises: NaN follows).
    z_finite = torch.where(torch.isfinite(z_spread).all(), z_spread, 0.0)
    _, singular, right = torch.linalg.svd(z_finite, full_matrices=False)
    seen = right[:k].mT  # (D, k)
    moments = singular[:k] ** 2 / num
    r_seen = 0.5 * (r_spread.mT @ (z_spread @ seen) + z_spread.mT @ (r_spread @ seen)) / num
    r_block = seen.mT @ r_seen
    e_seen = -r_block / (0.5 * (moments[:, None] + moments[None, :]) + prox_weight / 4)
    e_cross = -(r_seen - seen @ r_block).mT / (0.5 * moments[:, None] + prox_weight / 4)  # (k, D)
    basis, _ = torch.linalg.qr(torch.cat([seen, e_cross.mT], dim=1))
    seen_b, cross_b = basis.mT @ seen, basis.mT @ e_cross.mT
    g_b, z_b = basis.mT @ g_bar, basis.mT @ z_bar
    rest = (g_bar - basis @ g_b) + (z_bar - basis @ z_b)  # where P stays I
    eye_k = torch.eye(k, dtype=z.dtype, device=z.device)
    eye_b = torch.eye(basis.shape[1], dtype=z.dtype, device=z.device)

    def step(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fill = torch.linalg.solve_ex(eye_k + f * e_seen, cross_b.mT).result
        p = eye_b + f * seen_b @ e_seen @ seen_b.mT + f * (seen_b @ cross_b.mT + cross_b @ seen_b.mT)
        p = p + f**2 * cross_b @ fill
        d_b = f * torch.linalg.solve_ex(2 * p + prox_weight * eye_b, 2 * (g_b + p @ z_b)).result
        return p, d_b, f * 2 * rest / (2 + prox_weight)

    def kl_at(f: torch.Tensor) -> torch.Tensor:
        p, d_b, d_rest = step(f)
        chol, info = torch.linalg.cholesky_ex(p)
        logdet = 2 * torch.log(torch.diagonal(chol)).sum()
        kl = 0.5 * (torch.trace(p) - p.shape[0] - logdet + d_b @ p @ d_b + d_rest @ d_rest)
        return torch.where((info == 0) & torch.isfinite(kl), kl, torch.inf)

    frac = largest_step_fraction(kl_at, max_kl, z, num_bisections)
    p, d_b, d_rest = step(frac)
    cov_change = torch.linalg.inv_ex(p).inverse - eye_b
    return WhitenedStep(basis, cov_change, basis @ d_b + d_rest, frac)


def gaussian_proximal_step(
    loc_t: torch.Tensor,
    tril_t: torch.Tensor,
    particles: torch.Tensor,
    model_scores: torch.Tensor,
    prox_weight: float,
    max_kl: float,
    num_bisections: int = 40,
) -> GaussianStep:
    """The twin of :func:`numpyro_psvi.objective.gaussian_proximal_step`."""
    z = torch.linalg.solve_triangular(tril_t, (particles - loc_t).mT, upper=False).mT
    step = whitened_proximal_step(z, model_scores @ tril_t, prox_weight, max_kl, num_bisections)
    eye = torch.eye(loc_t.shape[0], dtype=loc_t.dtype, device=loc_t.device)
    cov_w = eye + step.basis @ step.cov_change @ step.basis.mT
    root, info = torch.linalg.cholesky_ex(0.5 * (cov_w + cov_w.mT))
    tril = tril_t @ torch.where(info == 0, root, torch.nan)  # not finite: the engine rejects it
    return GaussianStep(loc_t + tril_t @ step.shift, tril, step.frac)


def lowrank_axis_precision(
    z: torch.Tensor, g: torch.Tensor, step: WhitenedStep, prox_weight: float
) -> torch.Tensor:
    """The twin of :func:`numpyro_psvi.objective.lowrank_axis_precision`."""
    z_spread = z - z.mean(0)
    r_spread = (g - g.mean(0)) + z_spread
    fit = -(r_spread * z_spread).mean(0) / ((z_spread**2).mean(0) + prox_weight / 4)
    bounded = torch.clamp(fit, -LOWRANK_AXIS_STEP, 1 / (1 - LOWRANK_AXIS_STEP) - 1)
    outside = 1 - (step.basis**2).sum(1)
    return 1 + step.frac * outside * bounded


def lowrank_proximal_step(
    loc_t: torch.Tensor,
    factor_t: torch.Tensor,
    scale_t: torch.Tensor,
    particles: torch.Tensor,
    model_scores: torch.Tensor,
    prox_weight: float,
    max_kl: float,
    num_bisections: int = 40,
) -> GaussianStep:
    """The twin of :func:`numpyro_psvi.objective.lowrank_proximal_step` (``scale`` of the
    result: the pair ``(cov_factor, scale)``). A non-finite system gives non-finite
    values, which the engine rejects."""
    rank = factor_t.shape[1]
    gram = factor_t.mT @ factor_t  # as the twin: F's Gram matrix (eigh raises where not finite)
    gram_finite = torch.isfinite(gram).all()
    squares, right = torch.linalg.eigh(torch.where(gram_finite, gram, 0.0))
    squares = torch.where(gram_finite, torch.clamp(squares, min=0), torch.nan)
    left = (factor_t @ right) / torch.sqrt(torch.clamp(squares, min=torch.finfo(factor_t.dtype).tiny))
    root = torch.sqrt(1 + squares)

    def times_root(x: torch.Tensor, power: int) -> torch.Tensor:
        """``(I + F F')^{power/2} x`` for ``x`` of shape ``(D, n)``."""
        return x + left @ ((root**power - 1)[:, None] * (left.mT @ x))

    z = times_root(((particles - loc_t) / scale_t).mT, -1).mT
    g = times_root((model_scores * scale_t).mT, 1).mT
    step = whitened_proximal_step(z, g, prox_weight, max_kl, num_bisections)
    loc = loc_t + scale_t * times_root(step.shift[:, None], 1)[:, 0]
    spread = times_root(step.basis, 1)  # s^{-1} G
    change = 0.5 * (step.cov_change + step.cov_change.mT)  # symmetric to round-off
    ortho, tri = torch.linalg.qr(torch.cat([factor_t, spread], dim=1))
    middle = torch.block_diag(torch.eye(rank, dtype=loc_t.dtype, device=loc_t.device), change)
    finite = torch.isfinite(middle).all() & torch.isfinite(tri).all()
    inner = torch.where(finite, tri @ middle @ tri.mT, 0.0)  # eigh raises on NaN
    excess, vectors = torch.linalg.eigh(inner)
    top = (ortho @ vectors[:, -rank:]) * torch.sqrt(torch.clamp(excess[-rank:], min=0))  # s^{-1} Lam
    u, _, vt = torch.linalg.svd(torch.where(finite, top.mT @ factor_t, 0.0))  # svd raises on NaN
    top = top @ (u @ vt)  # the rotation nearest q_t's factor
    total = 1 + (factor_t**2).sum(1) + ((spread @ change) * spread).sum(1)  # diag(C) / s^2
    own = (total - (top**2).sum(1)) / lowrank_axis_precision(z, g, step, prox_weight)
    ratio = torch.maximum(own, LOWRANK_DIAG_FLOOR * total)  # Psi / s^2
    scale = torch.where(finite, scale_t * torch.sqrt(ratio), torch.nan)
    return GaussianStep(loc, (top / torch.sqrt(ratio)[:, None], scale), step.frac)


def diagonal_proximal_step(
    loc_t: torch.Tensor,
    scale_t: torch.Tensor,
    stats: FisherStatistics,
    curvature: CurvatureStatistics,
    prox_weight: float,
    weighting: str,
    max_kl: float,
    weights: torch.Tensor | None = None,
    num_bisections: int = 40,
) -> GaussianStep:
    """The twin of :func:`numpyro_psvi.objective.diagonal_proximal_step` (the algebra is
    :func:`psvi.objective.diagonal_step_path`, shared)."""
    path = diagonal_step_path(torch, scale_t, stats, curvature, prox_weight, weighting, weights)
    frac = largest_step_fraction(path.kl, max_kl, loc_t, num_bisections)
    ratio_f, delta = path.step(frac)
    return GaussianStep(loc_t + delta, scale_t / torch.sqrt(ratio_f), frac)
