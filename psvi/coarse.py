"""A coarse location correction for diagonal Gaussian guides with local latents (backend-free).

A diagonal guide's location moves coordinate by coordinate, so a direction along which
the posterior is pinned only by the priors (a global mean against the mean of its random
effects; a random effects' scale against their spread) is crossed at a small fraction of
a step per update, and at a small learning rate it crawls: crossed random effects end 5-11
optimum sds from ``mu``'s mean after 3,000 updates at Adam(1e-3) (docs/minibatch.md,
sections 18 and 19). As a two-level method does, the engines can add (``coarse_correction=True``;
off by default, section 19 says why) a fraction of a Newton step on a small *coarse* space
per update: each global coordinate that a local slot couples to
strongly, and per local slot (one coordinate of every member of a subsampled plate) a
*shift* direction (every member by its sd) and a *dilation* direction (every member along
its own location). What that step needs comes from the update's own particles and scores
(no score call more): with ``q`` Gaussian, Stein's identity gives ``E_q[-grad^2 log p]``
projected on the coarse directions ``U`` as ``-E[(U' g)(U' diag(scale)^-2 (u - loc))']``,
and the projected gradient is the particles' mean ``U' g``. Both are averaged over the
last :data:`COARSE_MEMORY` updates; at the variational optimum the projected gradient is
zero, so the correction keeps the fixed point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from psvi.objective import curvature_fold_rates

COARSE_MEMORY = 100
"""Updates over which the coarse gradient and curvature are averaged (a plain mean while
fewer)."""

COARSE_COUPLING = 0.5
"""A global joins the coarse space when its coupling to some slot direction,
``|C_gs| / sqrt(C_gg C_ss)`` of the averaged curvature ``C``, is at least this (algebraic
multigrid's strength of connection). Measured: a GLMM's mean against its intercepts'
shift 0.85-0.92, crossed effects' ``mu`` against either slot 0.97-1.00, the other globals
0.02-0.35; with every global in the space the GLMM's scale ``tau`` ended 1.9 sds off."""

COARSE_STEP = 0.01
"""The fraction of the averaged gradient's coarse Newton step taken per update: about one
over :data:`COARSE_MEMORY`, so that the average's lag does not make the loop oscillate.
With each update's own gradient (and 0.1, 0.03 or 0.01 of its step) the batch's noise,
amplified along the weakly pinned directions, left a quadratic target's globals 0.35-1.0
optimum sds off at Adam(1e-2), where the uncorrected engine ends within 0.03."""

COARSE_KL = 0.02
"""The largest move of a correction, in nats per coordinate of ``KL(q || q_moved)``
(the trust region's default budget); without it one seed's early steps diverged."""


class CoarseLayout(NamedTuple):
    """Where the coarse directions live in the flat latent of ``D`` coordinates.

    Attributes
    ----------
    global_coordinates : numpy.ndarray
        ``(G,)`` int: the global coordinates.
    global_of : numpy.ndarray
        ``(D,)`` int: a global coordinate's index among the ``G`` globals, ``G`` for a
        local one.
    slot_of : numpy.ndarray
        ``(D,)`` int: a local coordinate's slot, ``num_slots`` for a global one.
    num_globals, num_slots : int
    """

    global_coordinates: np.ndarray
    global_of: np.ndarray
    slot_of: np.ndarray
    num_globals: int
    num_slots: int


def coarse_layout(blocks: np.ndarray | None) -> CoarseLayout | None:
    """The :class:`CoarseLayout` of coordinates in ``blocks``
    (:func:`psvi.designs.coordinate_blocks`: 0 for the globals, ``k >= 1`` for slot
    ``k - 1``); ``None`` without local slots (nothing coarse to correct)."""
    if blocks is None or blocks.max(initial=0) == 0:
        return None
    is_global = blocks == 0
    num_globals, num_slots = int(is_global.sum()), int(blocks.max())
    global_of = np.where(is_global, np.cumsum(is_global) - 1, num_globals)
    slot_of = np.where(is_global, num_slots, blocks - 1)
    return CoarseLayout(np.flatnonzero(is_global), global_of, slot_of, num_globals, num_slots)


class CoarseStatistics(NamedTuple):
    """The coarse space's projected gradient ``U' E_q[grad log p]`` and curvature
    ``U' E_q[-grad^2 log p] U`` (in blocks), averaged over ``updates``
    (:func:`fold_coarse_statistics`).

    Attributes
    ----------
    gradient_globals, gradient_slots : array
        ``(G,)`` and ``(2 n,)``: the gradient along each global, then along each slot's
        shift and dilation.
    globals : array
        ``(G,)``: each global's own (the globals' couplings among themselves are left to
        the per-coordinate step, which sees them).
    coupling : array
        ``(G, 2 n)``: each global against each slot's shift, then each slot's dilation.
    slots : array
        ``(2 n, 2 n)``: the slot directions among themselves.
    updates : array
        ``()``: the updates averaged so far.
    """

    gradient_globals: Any
    gradient_slots: Any
    globals: Any
    coupling: Any
    slots: Any
    updates: Any


def empty_coarse_statistics(
    zeros: Callable[[tuple[int, ...]], Any], layout: Any, updates: Any
) -> CoarseStatistics:
    """:class:`CoarseStatistics` of ``layout``'s coarse space before any update: every
    average ``zeros(shape)`` (the backend's zeros in its dtype and device), the count
    ``updates`` (a zero of the backend's counter type)."""
    num_globals, num_directions = layout.num_globals, 2 * layout.num_slots
    return CoarseStatistics(
        zeros((num_globals,)), zeros((num_directions,)), zeros((num_globals,)),
        zeros((num_globals, num_directions)), zeros((num_directions, num_directions)), updates,
    )  # fmt: skip


class CoarseStep(NamedTuple):
    """A step's coefficients along the coarse directions: ``globals`` ``(G,)`` and
    ``slots`` ``(2 n,)`` (each slot's shift, then each slot's dilation)."""

    globals: Any
    slots: Any


def coarse_estimate(
    xp: Any,
    sum_by_slot: Callable[[Any], Any],
    layout: Any,
    loc_t: Any,
    scale_t: Any,
    particles: Any,
    model_scores: Any,
    weights: Any | None,
) -> CoarseStatistics:
    """One update's projected gradient and curvature from its ``S`` particles and their
    model scores (``xp``: ``jax.numpy`` or ``torch``; ``layout``'s index arrays in its type).

    ``model_scores`` are a local latent's own, ``weights`` its ``N/B`` in the batch and 0
    outside it (``None``: no subsampled plate), so each local's score counts ``N/B`` times
    (unbiased over the batches) and only the batch's members' deviations enter;
    ``sum_by_slot(values)``, ``(R, D) -> (R, n)``: each row's sums over each slot's
    coordinates (the backend's segment sum). Centring the scores removes the mean's
    contribution exactly.
    """
    if weights is not None:
        model_scores = model_scores * weights
    deviations = (particles - loc_t) / scale_t  # in sds
    seen = deviations if weights is None else deviations * (weights > 0)
    count = particles.shape[0]
    summed = sum_by_slot(
        xp.concatenate([model_scores * scale_t, model_scores * loc_t, seen, seen * loc_t / scale_t])
    )
    # The slots' shift directions (members by their sds), then their dilations (members
    # along their locations); the deviations weighted by direction over variance.
    slot_scores = xp.concatenate([summed[:count], summed[count : 2 * count]], 1)
    slot_deviations = xp.concatenate([summed[2 * count : 3 * count], summed[3 * count :]], 1)
    global_scores = (model_scores * scale_t)[:, layout.global_coordinates]
    global_deviations = deviations[:, layout.global_coordinates]
    mean_global, mean_slot = global_scores.mean(0), slot_scores.mean(0)
    centred_global, centred_slot = global_scores - mean_global, slot_scores - mean_slot
    globals_ = -(centred_global * global_deviations).sum(0) / count
    coupling = -(centred_global.T @ slot_deviations + (centred_slot.T @ global_deviations).T) / (2 * count)
    slots = -(centred_slot.T @ slot_deviations) / count
    slots = (slots + slots.T) / 2
    return CoarseStatistics(mean_global, mean_slot, globals_, coupling, slots, None)


def fold_coarse_statistics(xp: Any, old: CoarseStatistics, new: CoarseStatistics) -> CoarseStatistics:
    """``old`` with ``new`` folded in: a plain mean over the first :data:`COARSE_MEMORY`
    updates, then an exponential average over that many (the globals' curvature fold,
    :func:`psvi.objective.curvature_fold_rates`)."""
    updates = old.updates + 1
    rate = curvature_fold_rates(xp, 1.0, updates, COARSE_MEMORY, None, 1)
    folded = (before + rate * (after - before) for before, after in zip(old[:5], new[:5], strict=True))
    return CoarseStatistics(*folded, updates)


def coarse_newton_step(xp: Any, averages: CoarseStatistics) -> CoarseStep:
    """The Newton step ``C^-1 U' g`` on the coarse space of the averaged statistics, in
    the coarse directions' coefficients (zero for a global outside it, :data:`COARSE_COUPLING`; all zero where
    the curvature is not positive definite or the step not finite).

    The globals' own block is diagonal, so the step eliminates them (a Schur complement
    onto the ``2 n`` slot directions) and needs no ``G x G`` matrix."""
    diag_globals = averages.globals
    diag_slots = xp.diagonal(averages.slots)
    strength = xp.abs(averages.coupling) / xp.sqrt(
        xp.abs(diag_globals)[:, None] * xp.abs(diag_slots)[None, :] + 1e-30
    )
    joins = (xp.amax(strength, 1) >= COARSE_COUPLING) & (diag_globals > 0)
    coupling = averages.coupling * joins[:, None]
    inverse = joins / xp.where(joins, diag_globals, xp.ones_like(diag_globals))
    gradient_globals = averages.gradient_globals * joins
    schur = averages.slots - coupling.T @ (coupling * inverse[:, None])
    rhs = averages.gradient_slots - coupling.T @ (gradient_globals * inverse)
    values, vectors = xp.linalg.eigh(schur)
    positive = values.min() > 1e-12 * xp.abs(values).max()
    step_slots = vectors @ ((vectors.T @ rhs) / xp.where(values > 0, values, xp.ones_like(values)))
    step_globals = (gradient_globals - coupling @ step_slots) * inverse
    finite = xp.all(xp.isfinite(step_slots)) & xp.all(xp.isfinite(step_globals))
    keep = positive & finite
    zero_slots, zero_globals = xp.zeros_like(step_slots), xp.zeros_like(step_globals)
    return CoarseStep(xp.where(keep, step_globals, zero_globals), xp.where(keep, step_slots, zero_slots))


def coarse_move(xp: Any, layout: Any, loc: Any, scale: Any, step: CoarseStep) -> Any:
    """The ``(D,)`` move of the guide's location: :data:`COARSE_STEP` of ``step`` along
    the coarse directions, shortened to at most :data:`COARSE_KL` nats per coordinate.
    ``layout``'s index arrays in the backend's type."""
    num_slots = step.slots.shape[0] // 2
    zero = xp.zeros_like(step.globals[:1])
    globals_ = xp.concatenate([step.globals, zero])[layout.global_of]
    shift = xp.concatenate([step.slots[:num_slots], zero])[layout.slot_of]
    dilation = xp.concatenate([step.slots[num_slots:], zero])[layout.slot_of]
    move = COARSE_STEP * ((globals_ + shift) * scale + dilation * loc)
    kl = 0.5 * ((move / scale) ** 2).mean()
    return move * xp.where(kl > COARSE_KL, (COARSE_KL / xp.where(kl > 0, kl, 1.0)) ** 0.5, 1.0)


def resolve_coarse(requested: bool, layout: CoarseLayout | None) -> CoarseLayout | None:
    """The layout an engine corrects along: ``layout`` where the user's
    ``coarse_correction`` asks for it, else ``None``. Raise naming the fix when it is
    requested where there is none."""
    if requested and layout is None:
        raise ValueError(
            "coarse_correction=True moves a diagonal Gaussian guide's globals and local slots "
            "together along the directions the priors alone pin: it needs AutoNormal (or an "
            "AutoGuideList of AutoNormal parts) on a model with local latents in a subsampled "
            "plate. Leave it unset otherwise."
        )
    return layout if requested else None
