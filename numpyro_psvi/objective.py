"""The proximal score-matching objective (docs/algorithm.md, section 2).

For particles ``u_s ~ q_t`` with model scores ``g_s``::

    L_t(lam) = (1/S) sum_s r_s' W_t r_s + prox_weight * KL(q_t || q_lam),
    r_s = grad_u log q_lam(u_s) - g_s,

with ``W_t = Cov(q_t)`` (``weighting="covariance"``) or ``I``
(``weighting="identity"``); ``prox_weight`` is the paper's ``1/eta``.

For a diagonal Gaussian guide the Fisher term splits over coordinates, and each
coordinate needs the particles only through five sums over them
(:class:`FisherStatistics`): computed once per step, they make each of the ``K``
inner steps cost ``O(D)`` instead of ``O(S D)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from numpyro_psvi.guides import GuideDensity, LinearScoreStatistics, Params
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


def weighted_fisher(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: jax.Array,
    model_scores: jax.Array,
    weighting: str,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Mean over particles of ``r' W_t r`` with ``r = grad log q_params - g``.

    Parameters
    ----------
    density : GuideDensity
    params, params_t : dict
        Constrained guide params being fitted, and those the particles came from
        (the latter define ``W_t``; they are treated as constants).
    particles, model_scores : jax.Array
        Shape ``(S, D)`` each.
    weighting : {"covariance", "identity"}
    weights : jax.Array, optional
        ``(D,)`` per-coordinate weights of a mini-batch of local latents
        (:func:`numpyro_psvi.scores.coordinate_weights`): the sum becomes ``sum_d
        weights_d (...)_d``, unbiased for the full sum. Only for a diagonal ``W_t``
        (AutoNormal).
    """
    residuals = jax.vmap(density.score, (None, 0))(params, particles) - model_scores
    return residual_fisher(density, params_t, residuals, weighting, weights)


def residual_fisher(
    density: GuideDensity,
    params_t: Params,
    residuals: jax.Array,
    weighting: str,
    weights: jax.Array | None = None,
) -> jax.Array:
    """:func:`weighted_fisher` from its ``(S, D)`` residuals ``grad log q - g``."""
    if weights is not None:
        residuals = residuals * jnp.sqrt(weights)
    if weighting == "covariance":
        quad = jax.vmap(density.cov_quad, (None, 0))(params_t, residuals)
    else:
        quad = jnp.sum(residuals**2, axis=-1)
    return jnp.mean(quad)


def elbo_terms(
    density: GuideDensity,
    params: Params,
    particles: jax.Array,
    log_joints: jax.Array,
    weights: jax.Array | None = None,
) -> jax.Array:
    """The ``(S,)`` terms ``log p(u_s) - log q(u_s)`` whose mean is the ELBO estimate
    ``Trace_ELBO`` reports with ``S`` particles, from an update's own particles and log
    joints (no score call); their sd over ``sqrt(S)`` is its standard error (0 when ``q``
    is the posterior: every term is then ``log p(x)``).

    Parameters
    ----------
    density : GuideDensity
    params : dict
        Constrained guide params the particles came from.
    particles, log_joints : jax.Array
        ``(S, D)`` flat unconstrained particles and their ``(S,)`` log joints (the
        mini-batch's scaled by ``N/B`` by the plate, ``log|det J|`` included).
    weights : jax.Array, optional
        ``(D,)`` coordinate weights of local latents: ``log q`` counts the global
        coordinates and, times ``N/B``, the mini-batch's local ones, as the log joint
        counts their priors (the others are in neither): unbiased for the ELBO
        (``density.elbo_log_prob``).
    """
    if weights is None:
        log_q = jax.vmap(density.log_prob, (None, 0))(params, particles)
    else:
        log_q = jax.vmap(density.elbo_log_prob, (None, 0, None))(params, particles, weights)
    return log_joints - log_q


def negative_elbo(
    density: GuideDensity,
    params: Params,
    particles: jax.Array,
    log_joints: jax.Array,
    weights: jax.Array | None = None,
) -> jax.Array:
    """``-(1/S) sum_s [log p(u_s) - log q(u_s)]``: the loss ``Trace_ELBO`` reports with
    ``S`` particles (:func:`elbo_terms`, the same arguments)."""
    return -jnp.mean(elbo_terms(density, params, particles, log_joints, weights))


class FisherStatistics(NamedTuple):
    """Per-coordinate sums over ``S`` particles ``u_s`` with model scores ``g_s``, the
    particles centred at the step's guide location ``loc_t`` (``v_s = u_s - loc_t``, so
    that no sum cancels as the location moves): each ``(D,)``."""

    count: int
    offset: jax.Array  # sum_s v_s
    offset_sq: jax.Array  # sum_s v_s^2
    cross: jax.Array  # sum_s v_s g_s
    score: jax.Array  # sum_s g_s
    score_sq: jax.Array  # sum_s g_s^2


def fisher_statistics(
    density: GuideDensity, params_t: Params, particles: jax.Array, model_scores: jax.Array
) -> FisherStatistics | None:
    """The :class:`FisherStatistics` of a step, or ``None`` when the guide is not a
    diagonal Gaussian with closed-form scores (``density.loc_scale`` is ``None``)."""
    if density.loc_scale is None:
        return None
    offsets = jax.lax.stop_gradient(particles - density.loc_scale(params_t)[0])
    model_scores = jax.lax.stop_gradient(model_scores)
    return FisherStatistics(
        count=particles.shape[0],
        offset=offsets.sum(0),
        offset_sq=jnp.sum(offsets**2, 0),
        cross=jnp.sum(offsets * model_scores, 0),
        score=model_scores.sum(0),
        score_sq=jnp.sum(model_scores**2, 0),
    )


def diagonal_weighted_fisher(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    stats: FisherStatistics,
    weighting: str,
    weights: jax.Array | None = None,
) -> jax.Array:
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
    precision = scale**-2
    per_coordinate = precision**2 * centred_sq + 2 * precision * centred_cross + stats.score_sq
    if weighting == "covariance":
        per_coordinate = per_coordinate * scale_t**2
    if weights is not None:
        per_coordinate = per_coordinate * weights
    return jnp.sum(per_coordinate) / stats.count


class CurvatureStatistics(NamedTuple):
    """Per-coordinate spread of the particles and its covariance with the scores, in
    units of ``q_t``'s variance, each ``(D,)``: ``spread = sum_s (v_s - v_bar)^2 /
    sigma_t^2`` and ``cross = -sum_s (v_s - v_bar)(g_s - g_bar) / sigma_t^2`` (centred at
    the particle means; uncentred with one particle). ``cross / spread`` is the
    least-squares slope of ``-g`` on ``u``: the curvature of the model's log joint,
    exact on a separable quadratic one (Stein's identity makes ``E[cross]`` the expected
    curvature times ``E[spread]`` on any). A shift common to every particle's score (the
    mini-batch's gradient noise) drops out of both."""

    spread: jax.Array
    cross: jax.Array


def curvature_statistics(stats: FisherStatistics, scale_t: jax.Array) -> CurvatureStatistics:
    """The :class:`CurvatureStatistics` of a step from its :class:`FisherStatistics`."""
    spread, cross = stats.offset_sq, stats.cross
    if stats.count > 1:
        spread = spread - stats.offset**2 / stats.count
        cross = cross - stats.offset * stats.score / stats.count
    variance = scale_t**2
    return CurvatureStatistics(spread / variance, -cross / variance)


def coarse_statistics(
    layout: CoarseLayout,
    loc_t: jax.Array,
    scale_t: jax.Array,
    particles: jax.Array,
    model_scores: jax.Array,
    weights: jax.Array | None,
) -> CoarseStatistics:
    """One update's :func:`psvi.coarse.coarse_estimate` (its sums over each slot by
    ``jax.ops.segment_sum``); ``layout``'s index arrays as ``jax.Array``."""

    def sum_by_slot(values: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(values.T, layout.slot_of, layout.num_slots + 1)[:-1].T

    particles, model_scores = jax.lax.stop_gradient((particles, model_scores))
    return coarse_estimate(jnp, sum_by_slot, layout, loc_t, scale_t, particles, model_scores, weights)


def split_diagonal_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    stats: FisherStatistics,
    curvature: CurvatureStatistics,
    *,
    prox_weight: float,
    weighting: str,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """The split proximal objective of a diagonal Gaussian guide (docs/algorithm.md).

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
    params_t = jax.lax.stop_gradient(params_t)
    loc, scale = density.loc_scale(params)
    loc_t, scale_t = density.loc_scale(params_t)
    precision = scale**-2
    held = jax.lax.stop_gradient(precision)
    ratio = (scale_t / scale) ** 2  # p / p_t
    # The target p* / p_t of the precision; where the averaged curvature is not positive
    # (noise, or a non-concave direction such as a ReLU kink) it says nothing, and the
    # precision stays where the proximal term holds it (docs/minibatch.md, section 7).
    informative = (curvature.spread > 0) & (curvature.cross > 0)
    slope = curvature.cross / jnp.where(informative, curvature.spread, 1.0)
    target = jnp.where(informative, slope * scale_t**2, 1.0)
    spread = curvature.spread / stats.count * (ratio - target) ** 2 / scale_t**2
    delta = loc - loc_t
    mean_residual = (delta - stats.offset / stats.count) * held - stats.score / stats.count
    per_coordinate = spread + mean_residual**2
    if weighting == "covariance":
        per_coordinate = per_coordinate * scale_t**2
    if weights is not None:
        per_coordinate = per_coordinate * weights
    fisher = jnp.sum(per_coordinate)
    kl = 0.5 * jnp.sum(ratio - 1.0 - jnp.log(ratio) + held * delta**2)
    return fisher + prox_weight * kl, {"fisher": fisher, "kl": kl}


def split_full_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: jax.Array,
    model_scores: jax.Array,
    *,
    prox_weight: float,
    weighting: str,
) -> tuple[jax.Array, dict[str, Any]]:
    """The split proximal objective of a full-covariance Gaussian guide
    (:func:`split_diagonal_objective` with a precision matrix; docs/algorithm.md).

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
    params_t = jax.lax.stop_gradient(params_t)
    loc, tril = density.loc_tril(params)
    loc_t, tril_t = density.loc_tril(params_t)
    eye = jnp.eye(loc.shape[0], dtype=loc.dtype)
    tril_inv = solve_triangular(tril, eye, lower=True)
    precision = tril_inv.T @ tril_inv
    held = jax.lax.stop_gradient(precision)
    offsets = jax.lax.stop_gradient(particles) - loc_t
    model_scores = jax.lax.stop_gradient(model_scores)
    offset_mean, score_mean = offsets.mean(0), model_scores.mean(0)
    delta = loc - loc_t
    spread = (offsets - offset_mean) @ precision + (model_scores - score_mean)
    mean_residual = (offset_mean - delta) @ held + score_mean
    residuals = jnp.concatenate([spread, mean_residual[None]])
    if weighting == "covariance":
        residuals = residuals @ tril_t
    squares = jnp.sum(residuals**2, axis=-1)
    fisher = jnp.mean(squares[:-1]) + squares[-1]
    # KL(q_t || q) with P held in its location term delta' P delta / 2 (same value).
    kl = density.kl(params_t, params) + 0.5 * delta @ (held - precision) @ delta
    return fisher + prox_weight * kl, {"fisher": fisher, "kl": kl}


def proximal_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: jax.Array | None,
    model_scores: jax.Array | None,
    kl_key: jax.Array,
    *,
    prox_weight: float,
    weighting: str,
    weights: jax.Array | None = None,
    stats: FisherStatistics | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """``L_t(params)`` and its two terms (``fisher``, ``kl``) as auxiliary output;
    ``weights``: see :func:`weighted_fisher`; ``stats`` (:func:`fisher_statistics`),
    when given, replace ``particles`` and ``model_scores`` (the same value, in ``O(D)``)."""
    params_t = jax.lax.stop_gradient(params_t)
    if stats is not None:
        fisher = diagonal_weighted_fisher(density, params, params_t, stats, weighting, weights)
    else:
        fisher = weighted_fisher(density, params, params_t, particles, model_scores, weighting, weights)
    kl = density.kl(params_t, params, kl_key)
    return fisher + prox_weight * kl, {"fisher": fisher, "kl": kl}


def linear_score_solve(
    stats: LinearScoreStatistics,
    prox_weight: float,
    weighting: str,
    max_kl: float | jax.Array | None = None,
    iterations: int = LINEAR_SOLVE_ITERATIONS,
) -> tuple[jax.Array, jax.Array]:
    """The flat args ``(a, b)`` that minimize :func:`proximal_objective` for a guide with
    linear scores (:attr:`GuideDensity.linear_scores`), solved exactly, whatever the
    optimizer; with ``max_kl`` (the trust region's budget) the solution of the smallest weight ``prox_weight
    * 2^k`` whose ``KL(q_t || q)`` is within it. The twin of Pyro's (docs there), in the
    params' dtype: a full Newton step whose predicted decrease is below the objective's
    round-off is taken without the line search (float32 values cannot compare it); the
    ladder's weight found by bisection, one weight per solve, only where the update's own
    weight leaves the trust region (a ``while_loop`` that runs no iteration otherwise: a
    ``lax.cond`` over the whole ladder cost 0.1 ms an update untaken on a CPU,
    docs/guides.md, "NumPyro's ladder of weights by bisection"); likewise the line search,
    a ``while_loop`` over the fractions that ends at the first to decrease every entry (the
    whole step, near the solution)."""
    sums = stats.sums
    fisher = (stats.variances if weighting == "covariance" else jnp.ones_like(stats.variances)) / stats.count
    free_1, free_2 = (jnp.asarray(mask) for mask in stats.free)
    e_t1, e_t2 = stats.natural(*stats.args_t)
    grad_t1, grad_t2, *_ = stats.log_partition_derivatives(e_t1, e_t2)
    fractions = jnp.asarray(LINEAR_SOLVE_FRACTIONS, e_t1.dtype)
    round_off = 100 * jnp.finfo(e_t1.dtype).eps
    relative_tolerance = linear_solve_tolerance(float(jnp.finfo(e_t1.dtype).eps))

    def kl(x_1: jax.Array, x_2: jax.Array) -> jax.Array:
        return stats.log_partition(x_1, x_2) - grad_t1 * x_1 - grad_t2 * x_2  # + a constant

    def solve(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The solutions (K, D) at the (K, 1) weights."""

        def value(x_1: jax.Array, x_2: jax.Array) -> jax.Array:
            return linear_solve_value(jnp, sums, fisher, weight, (x_1, x_2), kl(x_1, x_2))

        def newton(carry):
            count, e_1, e_2, current, _ = carry
            derivatives = stats.log_partition_derivatives(e_1, e_2)
            step_1, step_2, slope = linear_newton_step(
                jnp, sums, fisher, weight, (e_1, e_2), (grad_t1, grad_t2), derivatives, (free_1, free_2)
            )
            negligible = -slope <= round_off * (1 + jnp.abs(current))

            def line_searching(search: tuple) -> jax.Array:
                """Whether a fraction is left to try and some entry has none that decreases it."""
                index, _, _, found = search
                return (index < len(LINEAR_SOLVE_FRACTIONS)) & ~jnp.all(found)

            def try_fraction(search: tuple) -> tuple:
                """The next fraction tried; kept where it is the first to decrease an entry."""
                index, fraction, reached, found = search
                trial = fractions[index]
                tried = value(e_1 + trial * step_1, e_2 + trial * step_2)
                decreases = (tried <= current + 1e-4 * trial * slope) & (slope < 0)
                decreases = decreases | ((index == 0) & negligible & jnp.isfinite(tried))
                kept = decreases & ~found
                fraction, reached = jnp.where(kept, trial, fraction), jnp.where(kept, tried, reached)
                return index + 1, fraction, reached, found | kept

            # The whole step first (Newton's near the solution, where one try ends the
            # search), then the halvings for the entries it does not decrease.
            start = (jnp.asarray(0), jnp.zeros_like(current), current, jnp.zeros(current.shape, bool))
            _, fraction, reached, _ = jax.lax.while_loop(line_searching, try_fraction, start)
            moved_1, moved_2 = fraction * step_1, fraction * step_2
            # Go on while the Newton step is not negligible (converged) and the line search
            # moved some coordinate by more than round-off (not stuck).
            size = relative_tolerance * (1 + jnp.maximum(jnp.abs(e_1), jnp.abs(e_2)))
            converged = jnp.all(jnp.abs(step_1) <= size) & jnp.all(jnp.abs(step_2) <= size)
            stuck = jnp.all(jnp.abs(moved_1) <= size) & jnp.all(jnp.abs(moved_2) <= size)
            return count + 1, e_1 + moved_1, e_2 + moved_2, reached, ~(converged | stuck)

        e_1, e_2 = (jnp.broadcast_to(part, (weight.shape[0],) + part.shape) for part in (e_t1, e_t2))
        start = (jnp.asarray(0), e_1, e_2, value(e_1, e_2), jnp.asarray(True))
        _, e_1, e_2, _, _ = jax.lax.while_loop(lambda c: (c[0] < iterations) & c[4], newton, start)
        return e_1, e_2

    def travelled(e_1: jax.Array, e_2: jax.Array) -> jax.Array:
        """``KL(q_t || q)`` of each row's solution."""
        return jnp.sum(kl(e_1, e_2) - kl(e_t1, e_t2), axis=-1)

    def searching(carry: tuple) -> jax.Array:
        """Whether the bracket ``(low, high]`` of the bisection is wider than one rung, or
        no rung within the budget is found yet."""
        low, high, _, _, found = carry
        return (high - low > 1) | ~found

    def bisect(carry: tuple) -> tuple:
        """One step of the search for the smallest ladder weight within the budget."""
        low, high, e_1, e_2, found = carry
        rung = jnp.where(high - low > 1, (low + high) // 2, high)  # ``high`` itself once bracketed
        weight = prox_weight * jnp.asarray(LINEAR_SOLVE_WEIGHTS, e_t1.dtype)[rung]
        r_1, r_2 = solve(jnp.reshape(weight, (1, 1)))
        within = (travelled(r_1, r_2)[0] <= max_kl) | (rung == high)
        moved = (jnp.where(within, r_1[0], e_1), jnp.where(within, r_2[0], e_2))
        return jnp.where(within, low, rung), jnp.where(within, rung, high), *moved, found | within

    e_1, e_2 = solve(jnp.full((1, 1), prox_weight, e_t1.dtype))
    e_1, e_2 = e_1[0], e_2[0]
    if max_kl is not None:
        inside = travelled(e_1[None], e_2[None])[0] <= max_kl
        top = len(LINEAR_SOLVE_WEIGHTS) - 1
        start = (jnp.asarray(0), jnp.where(inside, 0, top), e_1, e_2, inside)
        e_1, e_2 = jax.lax.while_loop(searching, bisect, start)[2:4]
    return stats.from_natural(e_1, e_2)


def transport_path(
    density: GuideDensity,
    params_t: Params,
    particles: jax.Array,
    residuals_t: jax.Array,
    fisher_t: jax.Array,
) -> TransportPath:
    """The :class:`~psvi.objective.TransportPath` of an update of a flow guide (``density.transport``);
    ``residuals_t`` and ``fisher_t``: the residuals ``grad log q_t - g`` at the particles
    and the Fisher term at ``params_t`` (:func:`residual_fisher`)."""
    params_t = jax.lax.stop_gradient(params_t)
    base = density.transport.pull(params_t, particles)
    weight = path_elbo_weight(fisher_t, density.latent_dim)
    fade = fisher_fade(fisher_t, density.latent_dim)
    return jax.lax.stop_gradient(TransportPath(base, -residuals_t, weight, fade))


def transport_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: jax.Array,
    model_scores: jax.Array,
    path: TransportPath,
    kl_key: jax.Array,
    *,
    prox_weight: float,
    weighting: str,
    fisher_weight: float = TRANSPORT_FISHER_WEIGHT,
) -> tuple[jax.Array, dict[str, Any]]:
    """A flow guide's ``L_t(params)`` (:func:`psvi.objective.path_elbo_weight`): the
    Fisher term, the map's displacement (``density.kl``) and the path ``-ELBO``
    linearized at ``q_t`` (``path``: :func:`transport_path`); the terms as auxiliary
    output (``kl``, ``path_elbo``, and ``fisher`` unless ``fisher_weight`` is 0:
    :func:`psvi.objective.transport_fisher_weight`)."""
    params_t = jax.lax.stop_gradient(params_t)
    # The Fisher term first (``None`` at weight 0): the order of the operations sets the
    # updates' round-off, which a flow's fit carries far.
    fisher = None
    if fisher_weight:
        fisher = weighted_fisher(density, params, params_t, particles, model_scores, weighting)
    kl = density.kl(params_t, params, kl_key)
    moved = density.transport.push(params, path.base) - particles
    path_elbo = -jnp.mean(jnp.sum(path.residuals * moved, axis=-1))
    if fisher is None:  # ``fisher_weight`` 0: no second derivatives of the flow
        return prox_weight * kl + path.weight * path_elbo, {"kl": kl, "path_elbo": path_elbo}
    value = fisher_weight * path.fisher_scale * fisher + prox_weight * kl + path.weight * path_elbo
    return value, {"fisher": fisher, "kl": kl, "path_elbo": path_elbo}


def lerp_tree(tree_from: Any, tree_to: Any, frac: jax.Array) -> Any:
    """Move floating leaves a fraction ``frac`` of the way; other leaves take ``tree_to``."""

    def lerp(a, b):
        if jnp.issubdtype(jnp.result_type(b), jnp.inexact):
            return a + frac * (b - a)
        return b

    return jax.tree.map(lerp, tree_from, tree_to)


def trust_region_fraction(kl_at: Any, max_kl: jax.Array | float, max_halvings: int) -> jax.Array:
    """Largest ``frac`` in ``{1, 1/2, ..., 2^-max_halvings}`` with ``kl_at(frac) <= max_kl``.

    ``frac`` is 0 when no fraction qualifies (or the KL is not finite), which rejects
    the step.
    """

    def too_far(kl):
        return (kl > max_kl) | ~jnp.isfinite(kl)

    def cond(carry):
        _, kl, n = carry
        return too_far(kl) & (n < max_halvings)

    def body(carry):
        frac, _, n = carry
        frac = frac / 2
        return frac, kl_at(frac), n + 1

    one = jnp.asarray(1.0)
    frac, kl, _ = jax.lax.while_loop(cond, body, (one, kl_at(one), 0))
    return jnp.where(too_far(kl), 0.0, frac)


class GaussianStep(NamedTuple):
    """A Gaussian guide's proximal step solved in closed form
    (:func:`gaussian_proximal_step`, :func:`lowrank_proximal_step`,
    :func:`diagonal_proximal_step`): the new ``loc`` and ``scale`` (the Cholesky factor
    of a full covariance, the pair ``(cov_factor, scale)`` of a low-rank one, the sds of
    a diagonal one), and the fraction of the solved step taken (0: no fraction kept the KL finite
    and in budget)."""

    loc: jax.Array
    scale: jax.Array | tuple[jax.Array, jax.Array]
    frac: jax.Array


def largest_step_fraction(
    kl_at: Callable[[jax.Array], jax.Array], max_kl: jax.Array | float, dtype: Any, num_bisections: int
) -> jax.Array:
    """The largest fraction ``f`` of a solved step with ``kl_at(f) <= max_kl``: 1 when
    the whole step fits (near convergence, every update), else ``num_bisections``
    bisections in ``log f`` down to :data:`psvi.objective.SMALLEST_STEP_FRACTION`; 0
    when not even that fits."""

    def bisect(_, bounds):
        low, high, found = bounds
        mid = low * jnp.sqrt(high / low)  # low * high underflows
        fits = kl_at(mid) <= max_kl
        return jnp.where(fits, mid, low), jnp.where(fits, high, mid), found | fits

    def search():
        # ``found``: whether ``low`` was seen to fit (a second evaluation of the KL at
        # ``low``, fused differently, can differ in the last float32 bit).
        smallest = jnp.asarray(SMALLEST_STEP_FRACTION, dtype)
        start = (smallest, jnp.ones_like(smallest), kl_at(smallest) <= max_kl)
        low, _, found = jax.lax.fori_loop(0, num_bisections, bisect, start)
        return jnp.where(found, low, 0.0)

    return jax.lax.cond(kl_at(jnp.ones((), dtype)) <= max_kl, lambda: jnp.ones((), dtype), search)


class WhitenedStep(NamedTuple):
    """The closed-form step in ``q_t``'s whitened coordinates
    (:func:`whitened_proximal_step`): the new guide is ``N(shift, I + basis
    cov_change basis')`` there (``cov_change`` symmetric to round-off), ``basis`` ``(D, b)``
    orthonormal with ``b <= 2 (S - 1)``;
    ``frac`` as in :class:`GaussianStep`."""

    basis: jax.Array
    cov_change: jax.Array
    shift: jax.Array
    frac: jax.Array


def whitened_proximal_step(
    z: jax.Array, g: jax.Array, prox_weight: float, max_kl: jax.Array | float, num_bisections: int = 40
) -> WhitenedStep:
    """The split proximal objective of a Gaussian guide with covariance weighting,
    solved in closed form in ``q_t``'s whitened coordinates (docs/algorithm.md), from
    the particles ``z = L_t^{-1}(u - loc_t)`` and the whitened scores
    ``g = L_t' grad log p(u)``, each ``(S, D)``, for any ``L_t`` with ``L_t L_t' =
    Cov(q_t)``.

    With the new guide ``N(d, P^{-1})`` in those coordinates, the residuals are
    ``g_s + P (z_s - d)`` and the objective is their mean square plus
    ``prox_weight * KL(N(0, I) || N(d, P^{-1}))``. As in :func:`split_full_objective`,
    ``P = I + E`` is fitted to the residuals' spread around the particles' mean, with
    the KL to second order (``|E|^2 / 4``): a linear equation in ``E``, solved in the
    basis of the ``k = min(S - 1, D)`` directions the centred particles span (where
    their second moments are ``m``) and its complement. The particles say nothing of
    ``P``'s block on the complement; the exact KL sets it so that the complement's
    marginal stays ``N(0, I)`` (a Schur complement), which keeps ``P`` positive
    definite whenever the fitted block is. The location is then exact for that ``P``:
    ``(2 P + prox_weight I) d = 2 (g_bar + P z_bar)``. Exact for a Gaussian target in
    the limit ``prox_weight -> 0`` with ``S > D``.

    The step taken is the fraction ``f`` of this solution (precision ``P_f = I + f E``,
    its complement block completed, and location ``f d_f``, ``d_f`` exact for ``P_f``)
    largest with ``KL(N(0, I) || N(f d_f, P_f^{-1})) <= max_kl`` (``num_bisections``
    bisections in ``log f`` down to :data:`psvi.objective.SMALLEST_STEP_FRACTION`): a
    trust region measured in the exact KL. ``O(S^2 D)``.
    """
    num, dim = z.shape
    z_bar, g_bar = z.mean(0), g.mean(0)
    z_spread = z - z_bar
    r_spread = (g - g_bar) + z_spread  # the residuals' spread under q_t (E = 0)
    k = min(num - 1, dim)
    # An SVD, not the (S, S) Gram matrix's eigenpairs (ten times cheaper at D = 1e4):
    # squaring the singular values cost far starts, whose residuals are ~1e7 and more,
    # up to 60% more updates and a dozen rejected ones (docs/lowrank_study.md).
    _, singular, right = jnp.linalg.svd(z_spread, full_matrices=False)
    seen = right[:k].T  # (D, k)
    moments = singular[:k] ** 2 / num
    # The symmetric part of C = r_spread' z_spread / S, in the seen basis and across.
    r_seen = 0.5 * (r_spread.T @ (z_spread @ seen) + z_spread.T @ (r_spread @ seen)) / num
    r_block = seen.T @ r_seen
    e_seen = -r_block / (0.5 * (moments[:, None] + moments[None, :]) + prox_weight / 4)
    e_cross = -(r_seen - seen @ r_block).T / (0.5 * moments[:, None] + prox_weight / 4)  # (k, D)
    basis, _ = jnp.linalg.qr(jnp.concatenate([seen, e_cross.T], axis=1))
    seen_b, cross_b = basis.T @ seen, basis.T @ e_cross.T
    g_b, z_b = basis.T @ g_bar, basis.T @ z_bar
    rest = (g_bar - basis @ g_b) + (z_bar - basis @ z_b)  # where P stays I
    eye_k, eye_b = jnp.eye(k, dtype=z.dtype), jnp.eye(basis.shape[1], dtype=z.dtype)

    def precision(f):
        """``P_f`` in the basis (identity on its complement)."""
        fill = jnp.linalg.solve(eye_k + f * e_seen, cross_b.T)
        return (
            eye_b + f * seen_b @ e_seen @ seen_b.T + f * (seen_b @ cross_b.T + cross_b @ seen_b.T)
            + f**2 * cross_b @ fill
        )  # fmt: skip

    def step(f):
        p = precision(f)
        d_b = f * jnp.linalg.solve(2 * p + prox_weight * eye_b, 2 * (g_b + p @ z_b))
        return p, d_b, f * 2 * rest / (2 + prox_weight)

    def kl_at(f):
        p, d_b, d_rest = step(f)
        chol = jnp.linalg.cholesky(p)
        logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        kl = 0.5 * (jnp.trace(p) - p.shape[0] - logdet + d_b @ p @ d_b + d_rest @ d_rest)
        return jnp.where(jnp.isfinite(kl), kl, jnp.inf)

    frac = largest_step_fraction(kl_at, max_kl, z.dtype, num_bisections)
    p, d_b, d_rest = step(frac)
    cov_change = jnp.linalg.inv(p) - eye_b
    return WhitenedStep(basis, cov_change, basis @ d_b + d_rest, frac)


def gaussian_proximal_step(
    loc_t: jax.Array,
    tril_t: jax.Array,
    particles: jax.Array,
    model_scores: jax.Array,
    prox_weight: float,
    max_kl: jax.Array | float,
    num_bisections: int = 40,
) -> GaussianStep:
    """The closed-form step of a full-covariance Gaussian guide
    (:func:`whitened_proximal_step`, whitened by the Cholesky factor ``L_t``). The new
    ``scale_tril`` is ``L_t chol(I + basis cov_change basis')``, the update's one
    ``O(D^3)``; everything else is ``O(S^2 D)``."""
    z = solve_triangular(tril_t, (particles - loc_t).T, lower=True).T
    step = whitened_proximal_step(z, model_scores @ tril_t, prox_weight, max_kl, num_bisections)
    dim = loc_t.shape[0]
    cov_w = jnp.eye(dim, dtype=loc_t.dtype) + step.basis @ step.cov_change @ step.basis.T
    tril = tril_t @ jnp.linalg.cholesky(0.5 * (cov_w + cov_w.T))
    return GaussianStep(loc_t + tril_t @ step.shift, tril, step.frac)


def lowrank_axis_precision(z: jax.Array, g: jax.Array, step: WhitenedStep, prox_weight: float) -> jax.Array:
    """Each whitened axis's precision change off the step's basis, ``1 + f w_i e_i``: the
    low-rank step's use of the family's diagonal (:func:`lowrank_proximal_step`).

    The whitened step fits ``P`` only in the ``b`` directions of its basis and keeps the
    rest at ``I``, which a full covariance must (the particles say nothing there), but a
    diagonal ``Psi`` is told something on every axis by every particle. So, as the seen
    block is fitted, each axis ``i`` fits ``e_i = -c_i / (m_i + prox_weight / 4)`` to the
    residual spread along it (``c_i``: the mean of ``(g_si - g_bar_i + z_si - z_bar_i)
    (z_si - z_bar_i)``, ``m_i`` of ``(z_si - z_bar_i)^2``), bounded to
    ``[-LOWRANK_AXIS_STEP, 1 / (1 - LOWRANK_AXIS_STEP) - 1]`` (a factor 2 at most in the
    axis's variance per update), weighted by the fraction ``w_i`` of the axis outside the
    basis and by the step's fraction ``f``. Off ``F``'s span the whitened axes are the
    coordinates' own (scaled by ``s``), so it divides ``Psi_i``. 1 wherever the residuals
    vanish: a target in the family stays a fixed point.
    """
    z_spread = z - z.mean(0)
    r_spread = (g - g.mean(0)) + z_spread
    fit = -jnp.mean(r_spread * z_spread, 0) / (jnp.mean(z_spread**2, 0) + prox_weight / 4)
    bounded = jnp.clip(fit, -LOWRANK_AXIS_STEP, 1 / (1 - LOWRANK_AXIS_STEP) - 1)
    outside = 1 - jnp.sum(step.basis**2, 1)
    return 1 + step.frac * outside * bounded


def lowrank_proximal_step(
    loc_t: jax.Array,
    factor_t: jax.Array,
    scale_t: jax.Array,
    particles: jax.Array,
    model_scores: jax.Array,
    prox_weight: float,
    max_kl: jax.Array | float,
    num_bisections: int = 40,
) -> GaussianStep:
    """The closed-form step of a low-rank-plus-diagonal guide, ``Cov = s (I + F F') s``
    (``s = diag(scale)``, ``F`` the raw ``(D, R)`` cov factor, as NumPyro's and Pyro's
    AutoLowRankMultivariateNormal), projected back onto its family.

    Whitened by ``L_t = s (I + F F')^{1/2}`` (products in ``O(D R)`` from the eigenpairs
    of ``F' F``), :func:`whitened_proximal_step` gives the full-covariance solution
    ``C = Cov(q_t) + G M G'`` with ``G = L_t basis`` (rank ``b <= 2 (S - 1)``). The new
    guide is its factor-analysis projection (``KL(N(0, C) || N(0, Lam Lam' + Psi))``
    minimized over ``Lam`` for ``Psi = s^2``: the top ``R`` eigenpairs of
    ``Psi^{-1/2} C Psi^{-1/2} = I + A N A'``, ``A = s^{-1} [s F, G]``, from one QR of
    ``A`` and an ``(R + b)``-square eigenproblem), then ``Psi = diag(C - Lam Lam')``,
    divided by each axis's own precision change off the basis
    (:func:`lowrank_axis_precision`), each coordinate held at or above
    :data:`psvi.objective.LOWRANK_DIAG_FLOOR` times its variance ``C_ii``; ``Lam`` rotated to the
    nearest of ``q_t``'s factor.
    A guide in the family that the whitened step keeps is kept: a Gaussian target of
    rank ``R`` plus diagonal is a fixed point. ``O(D (R + S)^2)``; ``frac`` is the
    whitened step's.

    Returns
    -------
    GaussianStep
        ``loc``, ``scale`` the pair ``(F, s)`` of the new guide, ``frac``.
    """
    rank = factor_t.shape[1]
    # F's left singular vectors from its (R, R) Gram matrix: where a singular value is
    # tiny its vector is inaccurate, but it enters only times root - 1 ~ sigma^2 / 2.
    squares, right = jnp.linalg.eigh(factor_t.T @ factor_t)
    squares = jnp.maximum(squares, 0)
    left = (factor_t @ right) / jnp.sqrt(jnp.maximum(squares, jnp.finfo(factor_t.dtype).tiny))
    root = jnp.sqrt(1 + squares)

    def times_root(x, power):
        """``(I + F F')^{power/2} x`` for ``x`` of shape ``(D, n)``."""
        return x + left @ ((root**power - 1)[:, None] * (left.T @ x))

    z = times_root(((particles - loc_t) / scale_t).T, -1).T
    g = times_root((model_scores * scale_t).T, 1).T
    step = whitened_proximal_step(z, g, prox_weight, max_kl, num_bisections)
    loc = loc_t + scale_t * times_root(step.shift[:, None], 1)[:, 0]
    spread = times_root(step.basis, 1)  # s^{-1} G
    change = 0.5 * (step.cov_change + step.cov_change.T)  # symmetric to round-off
    pieces = jnp.concatenate([factor_t, spread], axis=1)
    ortho, tri = jnp.linalg.qr(pieces)
    middle = jax.scipy.linalg.block_diag(jnp.eye(rank, dtype=loc_t.dtype), change)
    excess, vectors = jnp.linalg.eigh(tri @ middle @ tri.T)
    top = (ortho @ vectors[:, -rank:]) * jnp.sqrt(jnp.maximum(excess[-rank:], 0))  # s^{-1} Lam
    # Lam is defined up to a rotation: take the one nearest q_t's (orthogonal Procrustes),
    # so that the factor moves as little as the covariance does.
    u, _, vt = jnp.linalg.svd(top.T @ factor_t)
    top = top @ (u @ vt)
    # diag(C) / s^2 = 1 + rows of F F' + rows of spread M spread'
    total = 1 + jnp.sum(factor_t**2, 1) + jnp.sum((spread @ change) * spread, 1)
    own = (total - jnp.sum(top**2, 1)) / lowrank_axis_precision(z, g, step, prox_weight)
    ratio = jnp.maximum(own, LOWRANK_DIAG_FLOOR * total)  # Psi / s^2
    scale = scale_t * jnp.sqrt(ratio)
    return GaussianStep(loc, (top / jnp.sqrt(ratio)[:, None], scale), step.frac)


def diagonal_proximal_step(
    loc_t: jax.Array,
    scale_t: jax.Array,
    stats: FisherStatistics,
    curvature: CurvatureStatistics,
    prox_weight: float,
    weighting: str,
    max_kl: jax.Array | float,
    weights: jax.Array | None = None,
    num_bisections: int = 40,
) -> GaussianStep:
    """:func:`split_diagonal_objective` solved in closed form, coordinate by coordinate
    (:func:`psvi.objective.diagonal_step_path` has the algebra); the step taken is the
    fraction ``f`` of the solution largest with ``KL(q_t || q_f) <= max_kl``
    (:func:`largest_step_fraction`), as in :func:`gaussian_proximal_step`."""
    path = diagonal_step_path(jnp, scale_t, stats, curvature, prox_weight, weighting, weights)
    frac = largest_step_fraction(path.kl, max_kl, loc_t.dtype, num_bisections)
    ratio_f, delta = path.step(frac)
    return GaussianStep(loc_t + delta, scale_t / jnp.sqrt(ratio_f), frac)
