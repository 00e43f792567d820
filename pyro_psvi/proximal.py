"""``ProximalScoreVI``: a drop-in replacement for :class:`pyro.infer.SVI`.

One step is four phases, each a method, as in ``numpyro_psvi.proximal``
(docs/algorithm.md):

1. :meth:`~ScoreEngine.score_particles`: ``S`` particles from the current guide
   ``q_t`` and their mini-batch model scores (one vectorized pass, or one model call
   each);
2. :meth:`ProximalScoreVI.inner_fit`: ``K`` steps of the Pyro optimizer on the
   proximal score-matching objective (:meth:`ProximalScoreVI.proximal_problem`), one
   on the model's params;
3. :meth:`ProximalScoreVI.pull_back`: the fraction of the step that keeps
   ``KL(q_t || q_new) <= trust_region * D`` (halving; times the regime's
   :func:`~psvi.objective.trust_region_scale` when the model subsamples a plate);
4. :meth:`ProximalScoreVI.accept`: a step whose scores, objective or parameters are
   not finite is rejected (the previous parameters and optimizer state are restored
   and :attr:`ProximalScoreVI.num_rejected` counts it).

Parameters live in Pyro's param store, so ``guide.median()``, ``guide.quantiles()``
and ``Predictive`` work as after ``SVI``; with iterate averaging the store holds the
averaged iterate and the engine the last one, from which the next step starts.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from pyro.distributions.transforms import SoftplusTransform as PyroSoftplusTransform
from pyro.optim import PyroOptim
from torch.distributions.transforms import AffineTransform, ComposeTransform, ExpTransform, SoftplusTransform

from psvi.checkpoint import CheckpointMismatch, warn_if_inner_scale_changed
from psvi.checks import caller_stacklevel, check_proximal_options, inner_cost_advice
from psvi.coarse import (
    CoarseLayout,
    CoarseStatistics,
    coarse_layout,
    coarse_move,
    coarse_newton_step,
    empty_coarse_statistics,
    fold_coarse_statistics,
    resolve_coarse,
)
from psvi.designs import orthogonal_design, resolve_orthogonal
from psvi.objective import (
    TRANSPORT_FISHER_WEIGHT,
    ProximalScoreMatching,
    TrustRegionGrowth,
    amortizes_locals,
    check_inner_solver,
    curvature_fold_rates,
    discounted_updates,
    grow_trust_region,
    inner_objective_scale,
    local_curvature_visits,
    local_latent_memory_advice,
    resolve_antithetic,
    resolve_inner_solver,
    resolve_objective,
    resolve_regime,
    splits_full_covariance,
    stops_at_trust_region,
    transport_fisher_weight,
    trust_region_scale,
)
from psvi.schedules import (
    LossWindow,
    far_from_posterior,
    growing_prox_weight,
    iterate_average_rate,
    progress_budget_scale,
    progress_prox_weight,
    restarts_average,
)
from pyro_psvi._compat import FlatAdamSteps, flat_adam_state, torch_optimizer
from pyro_psvi.engine import ScoreEngine
from pyro_psvi.guides import (
    FlatRead,
    Params,
    antithetic,
    local_coordinates,
    local_plate_sizes,
    particle_blocks,
)
from pyro_psvi.objective import (
    CurvatureStatistics,
    FisherStatistics,
    coarse_statistics,
    curvature_statistics,
    diagonal_proximal_step,
    diagonal_weighted_fisher,
    elbo_terms,
    fisher_statistics,
    gaussian_proximal_step,
    linear_score_gradient,
    linear_score_solve,
    lowrank_proximal_step,
    proximal_objective,
    residual_fisher,
    split_diagonal_problem,
    split_full_objective,
    transport_objective,
    transport_path,
    trust_region_fraction,
)
from pyro_psvi.parallel import ScoreReducer
from pyro_psvi.scores import ModelScores


class RunningAverages(NamedTuple):
    """What :class:`ProximalScoreVI` averages across steps (``None`` where unused).

    Attributes
    ----------
    curvature : CurvatureStatistics or None
        Diagonal Gaussian guides: the statistics of the per-coordinate curvature
        (:class:`~pyro_psvi.objective.CurvatureStatistics`) averaged over the last
        ``curvature_memory`` steps (all of them while fewer); a local latent's over its
        last few visits (:func:`psvi.objective.local_curvature_visits`).
    curvature_updates : torch.Tensor or None
        How many steps saw each coordinate (a local latent only when its data are in
        the mini-batch); after closed-form steps, discounted by the KL they travelled
        (:func:`psvi.objective.discounted_updates`).
    params, params_updates
        With iterate averaging: the unconstrained params (guide and model) averaged over
        accepted steps, iterate ``i`` weighted by ``i^5`` (Polyak-Ruppert averaging that
        forgets the start: the first half of a run carries 1.6% of the weight), and the
        number of steps averaged since the average (re)started (a 0-dim tensor).
    trust : TrustRegionGrowth or None
        The closed-form step's KL budget growth (:class:`psvi.objective.TrustRegionGrowth`).
    window : LossWindow or None
        The closed-form step with iterate averaging: the ``-ELBO`` estimates of the
        averaged iterates (:class:`psvi.schedules.LossWindow`), which restart the average
        while the fit progresses (:func:`psvi.schedules.restarts_average`).
    coarse : CoarseStatistics or None
        With the coarse correction: its projected gradient and curvature averaged over
        the last steps (:class:`psvi.coarse.CoarseStatistics`).
    """

    curvature: CurvatureStatistics | None
    curvature_updates: torch.Tensor | None
    params: dict[str, torch.Tensor] | None
    params_updates: torch.Tensor
    trust: TrustRegionGrowth | None = None
    window: LossWindow | None = None
    coarse: CoarseStatistics | None = None


# The elementwise constraints whose forward and backward an inner step applies to all
# the entries they cover at once, in the transforms' own arithmetic: (forward, backward).
_ELEMENTWISE_CONSTRAINTS: dict[str, tuple[Callable, Callable]] = {
    "exp": (torch.exp, lambda grad, u, c: grad * c),
    "softplus": (
        torch.nn.functional.softplus,  # beta 1, threshold 20, as both transforms
        lambda grad, u, c: torch.ops.aten.softplus_backward(grad, u, 1.0, 20.0),
    ),
}


def _constraint_kind(transform: Any) -> str:
    """``"identity"``, ``"exp"`` (also Pyro's ``positive``: ``exp`` then ``+ 0``, the same
    numbers), ``"softplus"`` (AutoNormal's scales) or ``"monotone"`` (another elementwise
    monotone bijection) for a param's constraint transform. Raises
    ``NotImplementedError`` for any other transform."""
    parts = transform.parts if isinstance(transform, ComposeTransform) else [transform]
    if not parts:
        return "identity"
    exp_then_identity = type(parts[0]) is ExpTransform and all(
        isinstance(part, AffineTransform) and _is_constant(part.loc, 0.0) and _is_constant(part.scale, 1.0)
        for part in parts[1:]
    )
    if exp_then_identity:
        return "exp"
    if isinstance(transform, SoftplusTransform | PyroSoftplusTransform):
        return "softplus"
    elementwise = transform.domain.event_dim == 0 and transform.codomain.event_dim == 0
    sign = transform.sign if elementwise and transform.bijective else 0  # may raise: not monotone
    if sign not in (1, -1):
        raise NotImplementedError(f"{transform} is not an elementwise monotone bijection")
    return "monotone"


def _constraint_vjp(transform: Any, kind: str) -> Callable[..., torch.Tensor] | None:
    """``(grad, u, c) -> grad * dc/du`` for an elementwise, monotone bijection ``c =
    transform(u)`` of the :func:`_constraint_kind` ``kind``, in autograd's arithmetic
    where it is one op: ``None`` for the identity; ``grad * c`` for ``exp`` (autograd's
    ``grad * 1 * exp(u)``); autograd's own kernel for ``softplus``; else ``grad * sign *
    exp(log_abs_det_jacobian)``."""
    if kind == "identity":
        return None
    if kind in _ELEMENTWISE_CONSTRAINTS:
        return _ELEMENTWISE_CONSTRAINTS[kind][1]
    sign = transform.sign
    return lambda grad, u, c: grad * (sign * transform.log_abs_det_jacobian(u, c).exp())


def _is_constant(value: Any, number: float) -> bool:
    """Whether ``value`` (a number or tensor) is ``number`` everywhere."""
    return bool(torch.all(torch.as_tensor(value) == number))


def _all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """Whether every entry of ``tensors`` is finite (0-dim bool), from their sum: one pass
    where ``isfinite(...).all()`` takes five, and a NaN or an inf makes the sum one. So
    may an overflow of the sum (beyond 3e38 in float32), which reads as not finite: the
    safe side for the guards that use it."""
    return torch.isfinite(sum(tensor.sum() for tensor in tensors))


Index = torch.Tensor | slice  # entries of a vector: a long tensor, or one run as a slice (a view)


def _as_run(index: torch.Tensor) -> Index:
    """``index`` as a slice where it is one increasing run of entries, else itself."""
    count = index.numel()
    if count == 0:
        return index
    start = int(index[0])
    run = torch.arange(start, start + count, device=index.device)
    return slice(start, start + count) if bool((index == run).all()) else index


def _take(vector: torch.Tensor, index: Index) -> torch.Tensor:
    return vector[index] if isinstance(index, slice) else vector.index_select(0, index)


def _add_at(total: torch.Tensor, index: Index, values: torch.Tensor) -> None:
    if isinstance(index, slice):
        total[index].add_(values)
    else:
        total.index_add_(0, index, values)


class _FlatSidePart(NamedTuple):
    """The coordinates of a flat ``loc`` or ``scale`` that one constraint kind gives:
    ``positions`` among them (``None``: all), the flat params' entries they read."""

    positions: Index | None
    index: Index
    kind: str


class _FlatSide(NamedTuple):
    """One of the guide's flat ``loc`` and ``scale`` as read from the flat params: its
    parts by constraint kind, its constants (``None``: every coordinate is read) and
    its size."""

    parts: list[_FlatSidePart]
    constants: torch.Tensor | None
    size: int


def _tiling(sides: list[_FlatSide], size: int) -> list[int] | None:
    """The order of the sides' parts (counted over both sides) whose index runs tile
    ``range(size)`` exactly, or ``None``."""
    parts = [part.index for side in sides for part in side.parts]
    if not all(isinstance(index, slice) for index in parts):
        return None
    order = sorted(range(len(parts)), key=lambda i: parts[i].start)
    ends = [0] + [parts[i].stop for i in order]
    tiled = all(parts[i].start == end for i, end in zip(order, ends, strict=False)) and ends[-1] == size
    return order if tiled else None


def flat_sides(reads: tuple[FlatRead, FlatRead], kinds: dict[str, torch.Tensor]) -> list[_FlatSide]:
    """The :class:`_FlatSide` s of the guide's flat ``(loc, scale)`` read as ``reads``
    say from flat params whose entries have the constraint kinds ``kinds`` (by kind,
    ``"identity"`` or a key of ``_ELEMENTWISE_CONSTRAINTS``, the mask of its entries);
    each index one run (a slice) where it is."""
    sides = []
    for index, constants in reads:
        if isinstance(index, slice):  # one run: the side is whole entries of the kinds' masks
            sides.append(_run_side(index, kinds))
            continue
        given = index >= 0
        parts = []
        for kind, mask in kinds.items():
            covered = given & mask[index.clamp(min=0)]
            if bool(covered.all()):
                parts.append(_FlatSidePart(None, _as_run(index), kind))
            elif bool(covered.any()):
                positions = covered.nonzero().squeeze(-1)
                parts.append(_FlatSidePart(_as_run(positions), _as_run(index[positions]), kind))
        sides.append(_FlatSide(parts, None if bool(given.all()) else constants, index.numel()))
    return sides


def _run_side(run: slice, kinds: dict[str, torch.Tensor]) -> _FlatSide:
    """:func:`flat_sides`'s side of a :class:`FlatRead` that is one run of entries, read
    as views of the masks: the index path's gathers allocate D-sized indices (a run sent
    through them peaked at 57.7 D-vectors against 55.7 at D = 1.1e7, one CPU run each)."""
    parts = []
    for kind, mask in kinds.items():
        covered = mask[run]
        if bool(covered.all()):
            parts.append(_FlatSidePart(None, run, kind))
        elif bool(covered.any()):
            positions = covered.nonzero().squeeze(-1)
            parts.append(_FlatSidePart(_as_run(positions), _as_run(positions + run.start), kind))
    return _FlatSide(parts, None, run.stop - run.start)


class FlatGuideGradient(NamedTuple):
    """An inner step's gradient of every param at once, in the layout of one flat vector
    of their unconstrained values (:meth:`~pyro_psvi._compat.FlatAdamSteps.flat_layout`).

    Calling it gathers the guide's flat ``(loc, scale)`` from that vector
    (:func:`flat_sides`, from :attr:`~pyro_psvi.guides.GuideDensity.loc_scale_index`),
    applies each constraint kind to all the entries it covers in one op, takes the
    problem's closed-form gradient in ``(loc, scale)`` back by each kind's backward and
    an index-add (a slice-add for a run), zero where the guide's gradient is not
    finite. The numbers of
    :meth:`ProximalScoreVI._guide_gradients` (up to the order of a sum where the guide
    reads an entry twice), in a fixed handful of ops whatever the number of params.

    Attributes
    ----------
    sides : list of _FlatSide
        The flat ``loc`` and ``scale``.
    total : torch.Tensor
        A buffer of the flat vector's size for the result (a fresh one costs more than
        the op).
    tiling : list of int or None
        Where the parts' indices are runs that tile the whole flat vector (each entry
        read once, as for AutoNormal and AutoDiagonalNormal): the parts in the order of
        their runs, whose gradients are then concatenated.
    flat : torch.Tensor
        The flat values, read at each call (the optimizer steps them in place).
    gradient : callable
        ``gradient(loc, scale) -> (loc_grad, scale_grad)``: the objective's.
    """

    sides: list[_FlatSide]
    total: torch.Tensor
    tiling: list[int] | None
    flat: torch.Tensor
    gradient: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    def __call__(self) -> torch.Tensor:
        """The flat gradient at the current flat values."""
        flat = self.flat
        with torch.no_grad():
            values, read = [], []
            for parts, constants, size in self.sides:
                if constants is None and len(parts) == 1 and parts[0].positions is None:
                    value = None  # the one part is the whole side
                else:
                    value = flat.new_empty(size) if constants is None else constants.clone()
                for part in parts:
                    u = _take(flat, part.index)
                    c = u if part.kind == "identity" else _ELEMENTWISE_CONSTRAINTS[part.kind][0](u)
                    if value is None:
                        value = c
                    elif isinstance(part.positions, slice):
                        value[part.positions] = c
                    else:
                        value.index_copy_(0, part.positions, c)
                    read.append((part, u, c))
                values.append(value)
            grads = self.gradient(*values)
            sides = [grad for grad, side in zip(grads, self.sides, strict=True) for _ in side.parts]
            pieces = []
            for grad, (part, u, c) in zip(sides, read, strict=True):
                grad = grad if part.positions is None else _take(grad, part.positions)
                if part.kind != "identity":
                    grad = _ELEMENTWISE_CONSTRAINTS[part.kind][1](grad, u, c)
                pieces.append(grad)
            if self.tiling is not None:
                total = torch.cat([pieces[i] for i in self.tiling], out=self.total)
            else:
                total = self.total.zero_()
                for (part, _, _), grad in zip(read, pieces, strict=True):
                    _add_at(total, part.index, grad)
            finite = _all_finite(*grads)
            if finite.device.type != "cpu" or not finite:  # read at once on a CPU
                total = torch.where(finite, total, 0.0)
            return total


class ProximalProblem(NamedTuple):
    """One step's proximal problem.

    Attributes
    ----------
    objective : callable
        ``objective(params) -> ()``: ``L_t`` at constrained guide params.
    params_t : dict
        The constrained params the particles came from (detached).
    loss, loss_error : torch.Tensor
        The ``-ELBO`` estimate of ``q_t`` from the step's particles
        (:func:`~pyro_psvi.objective.elbo_terms`) and its standard error.
    fisher : torch.Tensor
        The weighted Fisher divergence of ``q_t`` on the step's particles and batch.
    param_grads : list of torch.Tensor
        The particles' mean log-joint gradient in each model param.
    scores_ok : torch.Tensor
        Whether every log joint and score was finite (0-dim bool).
    active_dim : int
        Coordinates the step can move (the trust region's ``D``).
    kl_seed : int or None
        Common random numbers for a Monte Carlo KL (or a flow's displacement) within
        the step.
    averages : RunningAverages
        The running averages with this step's curvature estimate folded in.
    gradient : callable or None
        ``gradient(loc, scale) -> (d/d loc, d/d scale)``: the objective's gradient in
        a diagonal guide's flat location and scale, in closed form (the split objective;
        :class:`~pyro_psvi.objective.SplitDiagonalProblem`), or in the two flat args of a
        guide with linear scores (:func:`~pyro_psvi.objective.linear_score_gradient`),
        else ``None``.
    statistics : FisherStatistics or None
        A diagonal Gaussian guide's per-coordinate sums over the particles, for the
        closed-form step; ``None`` otherwise (the optimizer's inner steps read the split
        objective's own constants, and the sums are freed before them).
    solution : dict or None
        With the closed-form solver, the constrained guide params that solve the problem
        of a guide with linear scores exactly
        (:func:`~pyro_psvi.objective.linear_score_solve`); ``None`` otherwise.
    """

    objective: Callable[[Params], torch.Tensor]
    params_t: Params
    loss: torch.Tensor
    loss_error: torch.Tensor
    fisher: torch.Tensor
    param_grads: list[torch.Tensor]
    scores_ok: torch.Tensor
    active_dim: int
    kl_seed: int | None
    averages: RunningAverages
    gradient: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    statistics: FisherStatistics | None = None
    solution: Params | None = None


class ProximalScoreVI(ScoreEngine):
    """Proximal score-based variational inference (Kim, arXiv:2602.05873).

    Use it where you would use ``SVI(model, guide, optim, Trace_ELBO())``::

        svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-2}))
        for step in range(2000):
            loss = svi.step(X, y)
        guide.median()

    Parameters
    ----------
    model : callable
        A Pyro model. Mini-batches come from its own ``pyro.plate(...,
        subsample_size=B)`` (or ``subsample=``); the plate's ``N/B`` scale makes the
        scores unbiased.
    guide : pyro.infer.autoguide.AutoGuide or callable
        AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
        AutoLowRankMultivariateNormal (closed-form scores), AutoIAFNormal,
        AutoNormalizingFlow (a flow's update, docs/algorithm.md), or a user-written guide
        with one ``pyro.sample`` site per latent site (nested autograd, Monte Carlo KL).
    optim : pyro.optim.PyroOptim
        Any Pyro optimizer (Adam, ClippedAdam, the LR schedulers).
    loss : psvi.ProximalScoreMatching, optional
        The objective (``prox_weight``, ``weighting``, ``num_kl_draws``), in the place
        where ``SVI`` takes its ELBO; the default is ``ProximalScoreMatching()``.
    num_particles : int
        Particles ``S`` per step, hence model score calls per step.
    inner_steps : int or None
        Optimizer steps ``K`` on each proximal objective (they cost no score calls).
        ``None``: 5 for a flow, whose steps stop once its map has moved past the trust
        region's budget (:func:`psvi.objective.stops_at_trust_region`; without a trust
        region 1 with mini-batch scores, else 20), 5 for a diagonal, full-covariance or
        low-rank Gaussian guide with mini-batch scores, else 20
        (:func:`psvi.objective.regime_defaults`).
    prox_weight, weighting
        Shorthands for the fields of ``loss`` (not together with it): the weight ``1/eta``
        of ``KL(q_t || q)`` (``None``, the default: 3 for the closed-form step of a
        full-covariance Gaussian guide, 0.5 while its fit progresses with at least ``D/4``
        particles (:func:`psvi.schedules.progress_prox_weight`), ``max(10, 5 N/B)`` with
        mini-batch scores for a guide that is neither a diagonal or full-covariance
        Gaussian nor a flow (:func:`psvi.objective.generic_prox_weight`), ``max(10, t)``
        at update ``t`` for the exact solve of a guide with linear scores with mini-batch
        scores (:data:`psvi.objective.LINEAR_SOLVE_PROX_WEIGHT_GROWTH`), else 10; a weight
        given here is constant;
        :func:`psvi.objective.regime_defaults`)
        and the residual weighting
        ``"covariance"`` (scale-free, the default) or ``"identity"``.
    trust_region : float or None
        Per-dimension KL budget: each step is pulled back toward ``q_t`` until
        ``KL(q_t || q_new) <= trust_region * D``, times a factor when the model
        subsamples (:func:`psvi.objective.trust_region_scale`): 5 for AutoNormal and
        AutoDiagonalNormal (at most ``N/B``), whose averaged guide settles better when
        each step moves less than the batch's noise would carry it (docs/minibatch.md
        section 10), 1 for a flow guide (its returned average of network weights
        needs small moves, docs/guides.md), 1 for a guide that amortizes its local
        latents (:func:`psvi.objective.amortizes_locals`: a step moves every member),
        and ``N/B`` (the largest ratio of a plate's
        size to its subsample size) for other guides: mini-batch noise alone moves each
        step by a KL that grows like ``N/B``. With exact scores, the closed-form step of
        a full-covariance Gaussian guide grows its budget (up to 2^30 times) while its
        steps pay off and undoes a grown step that did not
        (:func:`psvi.objective.grow_trust_region`): fits that start far from the
        posterior otherwise crawl; with iterate averaging its budget is at least 2.5
        times the default while the fit progresses
        (:func:`psvi.schedules.progress_budget_scale`). ``None`` turns the trust region off.
    vectorize_particles : bool
        Evaluate all particles in one model pass under an outer plate (the model
        must be broadcast-safe, as for ``Trace_ELBO(vectorize_particles=True)``).
        A model that cannot be vectorized is detected on the first step and then
        evaluated one particle at a time, with a warning.
    max_plate_nesting : int, optional
        The model's plate nesting; guessed from a model trace when omitted.
    score_method : {"closed_form", "autodiff"}
        How the guide's score is computed for Gaussian guides.
    max_halvings : int
        Trust-region halvings before the step is rejected (the optimizer path; the
        closed-form step bisects for the largest fraction that fits, down to 2^-120).
    max_consecutive_rejections : int or None
        :meth:`step` raises once this many steps in a row were rejected (``None``:
        never); :meth:`run` checks at its end.
    average_iterates : bool or None
        Keep the running average of the iterates (:class:`RunningAverages`) in the
        param store, while the steps continue from the last iterate. ``None`` (the
        default): on for a flow (with a trust region, or with mini-batch scores), for any
        other guide when the model subsamples a plate, whose mini-batch noise moves
        every iterate, and for the closed-form step of a
        full-covariance Gaussian guide (``inner_solver``); off otherwise. With the
        closed-form step the average restarts at the iterate while the fit progresses
        (:func:`psvi.schedules.restarts_average`, and at every update while its trust
        region has grown far: :func:`psvi.schedules.far_from_posterior`); with the
        default ``prox_weight`` (3 there) it settles the iterates that wander about a
        non-Gaussian posterior, follows them on Gaussian ones and on far starts
        (docs/gaussian_study.md, "Averaged iterates"). A checkpoint saved with the other
        setting is refused by name.
    data_parallel : bool, ScoreReducer or None
        Split each mini-batch over the ranks of a ``torch.distributed`` process group,
        every rank taking the same steps (docs/data_parallel.md). ``None`` (the default):
        on when a process group of more than one rank is initialized at the first step.
    inner_solver : {"closed_form", "optimizer"} or None
        How each proximal problem is solved: ``"closed_form"`` for an autoguide
        Gaussian (:func:`~pyro_psvi.objective.gaussian_proximal_step` for a full
        covariance, the split objective solved in ``q_t``'s whitened coordinates;
        :func:`~pyro_psvi.objective.lowrank_proximal_step` for
        AutoLowRankMultivariateNormal, that solution projected onto its family;
        :func:`~pyro_psvi.objective.diagonal_proximal_step` for AutoNormal and
        AutoDiagonalNormal, coordinate by coordinate; the step the largest fraction in
        the trust region, which grows while its steps pay off; the optimizer does not
        move the guide's params), or ``"optimizer"`` (``inner_steps`` steps of
        ``optim``). ``None`` (the default): the closed form where it is the default
        (:func:`psvi.objective.resolve_inner_solver`: a full or low-rank covariance,
        exact scores, no model params) unless ``inner_steps`` is given. For a mean-field
        user guide whose Beta, Gamma, InverseGamma, LogNormal or Normal sites read their
        args from its params, ``"closed_form"`` is the exact solve of each update
        (:func:`~pyro_psvi.objective.linear_score_solve`), the default with exact scores
        and the weight ``10 N/B`` on request with a subsampled plate; an update whose
        args are not read one to one from the params takes the optimizer's steps.
    antithetic_particles : bool or None
        Draw the ``S`` particles of a Gaussian guide in antithetic pairs: ``ceil(S / 2)``
        draws and the first ``floor(S / 2)`` reflected about the guide's mean (each still a
        draw of ``q_t``, their mean ``q_t``'s for even ``S``), which removes the
        particles' common shift from each update's location fit (:func:`~pyro_psvi.guides.antithetic`;
        docs/gaussian_study.md, "Antithetic particles"). ``None`` (the default): off.
    orthogonal_particles : bool or None
        With local latents in a subsampled plate and a diagonal Gaussian guide (AutoNormal),
        draw the ``S`` particles so that the deviations of the globals and of each local
        slot (one coordinate of every member of the plate) are orthogonal across the
        particles (:mod:`psvi.designs`; each particle still a draw of ``q_t``): a global's
        curvature estimate then carries none of the batch's locals' particle noise, which
        otherwise leaves a global coupled to them (a GLMM's mean or scale) with its sd
        22-33% short (docs/minibatch.md section 17). ``None`` (the default): on wherever it
        applies and ``num_particles`` is a multiple of the design's group size (4 for up to
        three blocks, then 8, 16, ...); it replaces ``antithetic_particles`` (its blocks'
        particles already average to ``q_t``'s mean).
    coarse_correction : bool
        With local latents in a subsampled plate and a diagonal Gaussian autoguide, add
        to each accepted step a hundredth of a Newton step on a coarse space (each local
        slot's shift and dilation, and the globals coupled to them), its gradient and
        curvature averaged from the steps' own particles (:mod:`psvi.coarse`; no score
        call more). A diagonal guide otherwise crawls along the directions only the
        priors pin (a GLMM's mean against its intercepts' mean) at a small learning rate:
        on crossed random effects at Adam(1e-3) it brings ``mu`` from 5-11 to within 0.2
        of the optimum's sds in 3,000 steps; at Adam(1e-2), where the fits had arrived,
        its noise costs some accuracy, the random effects' scales arrive more slowly
        and a robust BNN predicted worse (docs/minibatch.md section 19). Off by default.
    reshuffle : bool
        Draw the mini-batches of the model's subsampled plates by random reshuffling
        (:mod:`pyro_psvi.batches`: every member once per epoch, as
        ``DataLoader(shuffle=True, drop_last=True)``) rather than independently, as the
        plate alone does; its averaged iterates converge far faster (docs/minibatch.md
        section 9). No effect on models without a subsampled plate.

    Notes
    -----
    A rejected step restores the parameters and the optimizer's state (a copy of the
    optimizer's state is taken each step for that); so does an exception or
    ``KeyboardInterrupt`` inside :meth:`update`, which leaves the engine at its last
    completed step (the RNG streams excepted) and re-raises.
    """

    def __init__(
        self,
        model: Callable,
        guide: Any,
        optim: PyroOptim,
        loss: ProximalScoreMatching | None = None,
        *,
        num_particles: int = 4,
        inner_steps: int | None = None,
        prox_weight: float | None = None,
        weighting: str | None = None,
        trust_region: float | None = 0.02,
        vectorize_particles: bool = True,
        max_plate_nesting: int | None = None,
        score_method: str = "closed_form",
        max_halvings: int = 12,
        max_consecutive_rejections: int | None = 20,
        average_iterates: bool | None = None,
        data_parallel: bool | ScoreReducer | None = None,
        reshuffle: bool = True,
        inner_solver: str | None = None,
        antithetic_particles: bool | None = None,
        orthogonal_particles: bool | None = None,
        coarse_correction: bool = False,
    ) -> None:
        objective = resolve_objective(loss, prox_weight, weighting)
        check_proximal_options(inner_steps, trust_region)
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim must be a pyro.optim optimizer (e.g. pyro.optim.Adam({{'lr': 1e-2}})), "
                f"got {type(optim).__name__}; wrap torch optimizers with pyro.optim.PyroOptim."
            )
        super().__init__(
            model, guide, num_particles=num_particles, vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting, score_method=score_method,
            num_kl_draws=objective.num_kl_draws,
            max_consecutive_rejections=max_consecutive_rejections, data_parallel=data_parallel,
            reshuffle=reshuffle,
        )  # fmt: skip
        self.optim = optim
        self.objective = objective
        self._requested = (inner_steps, average_iterates, objective.curvature_memory, objective.prox_weight)
        self.trust_region_scale = 1.0  # the KL budget's regime factor, set up with the regime
        self.transport_fisher_weight = TRANSPORT_FISHER_WEIGHT  # a flow's Fisher term's, likewise
        self.stops_at_budget = False  # whether the inner steps stop past the budget, likewise
        self.split_covariance = False  # a full-covariance guide's split objective, likewise
        self._requested_solver = check_inner_solver(inner_solver)
        self._requested_antithetic = antithetic_particles
        self._requested_orthogonal = orthogonal_particles
        self._requested_coarse = coarse_correction
        self.coarse_layout: CoarseLayout | None = None  # set up with the regime
        self.inner_solver = "optimizer"  # set up with the regime
        self.inner_steps = inner_steps
        self.trust_region = trust_region
        self.max_halvings = int(max_halvings)
        self.average_iterates = average_iterates
        self.curvature_memory = objective.curvature_memory
        self._local_coordinates: torch.Tensor | None = None  # set up with the regime
        self._local_visits = 1  # likewise (psvi.objective.local_curvature_visits)
        self.averages: RunningAverages | None = None
        self._iterate: dict[str, torch.Tensor] | None = None
        self._inner_cost_countdown = -1  # updates before the timed one (set up with the guide)
        self._vjps: dict[str, Callable | None] | None = None  # found at the first inner step
        self._kinds: dict[str, str] | None = None  # the guide params' constraint kinds, likewise
        self._vjps_found = False
        self._flat_sides: tuple | None = None
        self.gaussian_step = False  # set up with the regime

    def _setup(self, args: tuple, kwargs: dict) -> None:
        super()._setup(args, kwargs)
        diagonal = self.density.loc_scale is not None
        gaussian = diagonal or self.family.full_covariance
        transport = self.density.transport is not None
        bounded = self.trust_region is not None  # a budget the steps can stop at
        guide_shapes = [tuple(leaf.shape) for leaf in self._leaves().values()]
        amortized = amortizes_locals(guide_shapes, local_plate_sizes(self.density))
        self.trust_region_scale = trust_region_scale(diagonal, self.batch_ratio, transport, amortized)
        self.transport_fisher_weight = transport_fisher_weight(self.batch_ratio)
        self.stops_at_budget = stops_at_trust_region(transport, bounded)
        self.split_covariance = self.density.loc_tril is not None and splits_full_covariance(
            self.batch_ratio, self.num_particles
        )
        self.inner_solver = resolve_inner_solver(
            self._requested_solver, gaussian_step=self.density.gaussian_params is not None,
            full_covariance=self.density.loc_tril is not None or self.density.loc_lowrank is not None,
            batch_ratio=self.batch_ratio, weighting=self.objective.weighting,
            num_particles=self.num_particles, inner_steps=self._requested[0],
            has_model_params=bool(self._model_param_names), data_parallel=self.reducer is not None,
            linear_step=self.density.linear_scores is not None,
        )  # fmt: skip
        # The closed form of an autoguide Gaussian (closed_form_step) rather than a guide
        # with linear scores' exact solve (inner_fit's).
        self.gaussian_step = self.inner_solver == "closed_form" and self.density.gaussian_params is not None
        self.antithetic_particles = resolve_antithetic(
            self._requested_antithetic, antithetic(self.density) is not None
        )
        blocks = particle_blocks(self.density, self._subsampled_plates)
        design = None if blocks is None else orthogonal_design(blocks, self.num_particles)
        self.particle_design = resolve_orthogonal(self._requested_orthogonal, design)
        movable = blocks is not None and self.density.gaussian_params is not None
        layout = resolve_coarse(self._requested_coarse, coarse_layout(blocks if movable else None))
        self.coarse_layout = None
        if layout is not None:
            device = next(iter(self._leaves().values())).device
            indices = (torch.as_tensor(index, device=device) for index in layout[:3])
            self.coarse_layout = CoarseLayout(*indices, *layout[3:])
        # The families' advice measured the optimizer's inner steps (the closed forms do
        # not take the optimizer's step size, and converged where those diverged).
        advice = self.family.advice and self.family.advice(self.density.latent_dim, self.num_particles)
        if advice and self.inner_solver == "optimizer":
            warnings.warn(advice, UserWarning, stacklevel=caller_stacklevel())
        closed_form = self.inner_solver == "closed_form" and self.density.loc_tril is not None
        low_rank_step = self.inner_solver == "closed_form" and self.density.loc_lowrank is not None
        regime = resolve_regime(
            gaussian, self.batch_ratio, *self._requested, closed_form, low_rank_step, transport,
            bounded=bounded, low_rank=self.density.loc_lowrank is not None,
            linear_solve=self.inner_solver == "closed_form" and self.density.linear_scores is not None,
            particles_per_dim=self.num_particles / max(self.density.latent_dim, 1),
        )  # fmt: skip
        self.inner_steps, self.average_iterates, self.curvature_memory, prox_weight, growth, progress = regime
        self._local_coordinates = local_coordinates(self.density, self._subsampled_plates)
        self._local_visits = local_curvature_visits(self.batch_ratio)
        memory_advice = local_latent_memory_advice(
            diagonal,
            self.batch_ratio,
            self._local_coordinates is not None,
            self._requested[2],
            orthogonal=self.particle_design is not None,
        )
        if memory_advice:
            warnings.warn(memory_advice, UserWarning, stacklevel=caller_stacklevel())
        self.objective = self.objective._replace(prox_weight=prox_weight)
        self.prox_weight_growth = growth  # the exact solve's, with a subsampled plate
        self.progress_prox_weight = progress  # the closed-form step's, while its fit progresses
        if self.averages is None:  # else restored by load
            self._start_averages()
        self._vjps_found = False  # the guide params' transforms may be new
        self._flat_sides = None  # (reads, layout, sides, tiling, total) of _flat_guide_gradient
        # Guides without closed-form scores, and user-written guides, re-run their density
        # at every inner step: their second update is timed.
        timed = self.density.runs_guide or not self.density.closed_form
        self._inner_cost_countdown = 1 if timed else -1

    def _start_averages(self) -> None:
        """Empty curvature statistics (a diagonal guide) and, with iterate averaging, the
        store's params as the first iterate and average."""
        leaves = self._leaves(model_params=True)
        device = next(iter(leaves.values())).device
        diagonal = self.density.loc_scale is not None
        zeros = torch.zeros(self.density.latent_dim, device=device)
        curvature = CurvatureStatistics(zeros, zeros) if diagonal else None
        updates = zeros if diagonal else None
        params = window = None
        if self.average_iterates:
            self._iterate = {name: leaf.detach().clone() for name, leaf in leaves.items()}
            params = {name: leaf.detach().clone() for name, leaf in leaves.items()}
            window = self._fresh_window(device)
        count = torch.zeros((), device=device)
        self.averages = RunningAverages(
            curvature, updates, params, count, window=window, coarse=self._fresh_coarse(device)
        )

    def _fresh_coarse(self, device: torch.device) -> CoarseStatistics | None:
        """Empty :class:`~psvi.coarse.CoarseStatistics` with the coarse correction, else ``None``."""
        if self.coarse_layout is None:
            return None
        zeros = partial(torch.zeros, device=device)
        return empty_coarse_statistics(zeros, self.coarse_layout, zeros(()))

    def _fresh_window(self, device: torch.device) -> LossWindow | None:
        """An empty :class:`~psvi.schedules.LossWindow` for the closed-form step with iterate
        averaging, else ``None``."""
        if not self.gaussian_step:
            return None
        return LossWindow(torch.full((), torch.inf, device=device), torch.zeros((), device=device))

    def _checkpoint_extra(self) -> dict:
        scale = inner_objective_scale(self.objective.prox_weight)
        return {"averages": self.averages._asdict(), "iterate": self._iterate, "inner_objective_scale": scale}

    def _load_checkpoint_extra(self, extra: dict) -> None:
        if self.inner_solver == "optimizer":  # the closed-form steps do not step it
            warn_if_inner_scale_changed(extra.get("inner_objective_scale"), self.objective.prox_weight)
        averages = RunningAverages(**extra["averages"])
        saved = (averages.curvature is not None, extra["iterate"] is not None)
        current = (self.density.loc_scale is not None, self.average_iterates)
        if saved != current:

            def kind(curvature: bool, iterates: bool) -> str:
                return (
                    f"{'with' if curvature else 'without'} curvature averages (a diagonal Gaussian's "
                    f"objective) and {'with' if iterates else 'without'} iterate averaging"
                )

            raise CheckpointMismatch(
                f"The checkpoint's running averages were saved by an engine fitting this guide "
                f"{kind(*saved)}; this engine fits it {kind(*current)}. Build the engine with the "
                "saved run's average_iterates; if the guide's fit changed with the package (a "
                "hand-written guide that is Normal in the unconstrained space is fitted as "
                "AutoNormal, docs/guides.md), start a new run from the saved params instead."
            )
        if averages.curvature is not None:
            averages = averages._replace(curvature=CurvatureStatistics(*averages.curvature))
        if averages.coarse is not None:
            averages = averages._replace(coarse=CoarseStatistics(*averages.coarse))
        elif self.coarse_layout is not None:  # saved before the coarse correction: a fresh one
            averages = averages._replace(coarse=self._fresh_coarse(averages.params_updates.device))
        if averages.trust is not None:  # a checkpoint without one starts at the default budget
            averages = averages._replace(trust=TrustRegionGrowth(*averages.trust))
        if averages.window is not None:
            averages = averages._replace(window=LossWindow(*averages.window))
        elif averages.params is not None:  # saved before the window existed: a fresh one
            averages = averages._replace(window=self._fresh_window(averages.params_updates.device))
        self.averages = averages
        self._iterate = extra["iterate"]

    def update(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One update: ``S`` score calls and ``K`` optimizer steps.

        Returns
        -------
        torch.Tensor
            0-dim, on the params' device (no host sync): the loss, as ``SVI``'s, the
            ``-ELBO`` estimate of ``q_t`` from this step's ``S`` particles and mini-batch
            (no extra score call); NaN when the step was rejected. The weighted Fisher
            divergence the step minimizes is :meth:`~pyro_psvi.ScoreEngine.fisher_divergence`.
        """
        self._prepare(args, kwargs)
        leaves = self._leaves(model_params=True)
        with torch.no_grad():  # the last iterate (the store may hold the average)
            start = {name: (leaf if self._iterate is None else self._iterate[name]).detach().clone()
                     for name, leaf in leaves.items()}  # fmt: skip
        stored = start if self._iterate is None else self.averages.params
        # The inner steps defer the moments of the params they step on flat copies: only
        # the others' optimizer state is copied here, to undo a rejected step.
        saved_optimizer_state = self._optimizer_state_copy(leaves, flat=not self.gaussian_step)
        averages, iterate = self.averages, self._iterate
        pending: list[FlatAdamSteps] = []  # whose moments written here an interrupt takes back

        def restore() -> None:
            for steps in pending:
                steps.undo_moments()
            current = self._optimizer_state(list(leaves.values()))
            self._restore_optimizer_state(current, saved_optimizer_state, torch.tensor(False))
            self.averages, self._iterate = averages, iterate

        with self._restored_on_interrupt(leaves, stored, restore):
            with torch.no_grad():
                if self._iterate is not None:
                    for name, leaf in leaves.items():
                        leaf.copy_(start[name])
                params_t = self._constrain(start)
            model_leaves = [leaves[name] for name in self._model_param_names]
            # Timed on a CPU only: elsewhere the clock would need a device sync.
            timed = self._inner_cost_countdown == 0 and next(iter(start.values())).device.type == "cpu"
            self._inner_cost_countdown = max(self._inner_cost_countdown - 1, -1)
            started = time.perf_counter()
            particles, scored = self.score_particles(params_t, args, kwargs, model_leaves, statistics=True)
            scored_at = time.perf_counter()
            problem = self.proximal_problem(params_t, particles, scored)
            if self.gaussian_step:
                accept, averages = self.closed_form_step(
                    problem, particles, scored, start, leaves, saved_optimizer_state
                )
                problem = problem._replace(averages=averages)
            else:
                unread = self.unread_entries(start, particles)
                del particles, scored  # what the problem needs, it holds (a diagonal guide: sums)
                fit_at = time.perf_counter()
                if problem.solution is not None:  # solved: the optimizer does not step
                    self._write_solution(problem.solution, leaves)
                    moments = ()
                else:
                    stepped = self.inner_fit(problem, leaves)
                    pending.extend(stepped)
                    moments = [moment for steps in stepped for moment in steps.moments()]
                    if timed:
                        self._advise_inner_cost(time.perf_counter() - fit_at, scored_at - started)
                self.hold(unread, start, leaves)
                if problem.solution is None:
                    frac = self.pull_back(problem, start, leaves)
                else:  # within the budget by construction (the solve's weight ladder), finite
                    frac = torch.ones_like(problem.loss)
                accept = self.accept(problem, start, leaves, frac, saved_optimizer_state, moments)
                if problem.averages.coarse is not None:
                    self._coarse_correct(problem.averages.coarse, leaves, accept)
            self.record(accept)
            self._advance_averages(problem, leaves, accept)
            for steps in pending:  # last (an interrupt inside it: restore undoes it)
                steps.write_moments(accept)
        return torch.where(accept, problem.loss, torch.full_like(problem.loss, float("nan")))

    def _write_solution(self, solution: Params, leaves: dict[str, torch.Tensor]) -> None:
        """Write the constrained ``solution`` (:attr:`ProximalProblem.solution`) into the
        guide's unconstrained ``leaves``."""
        with torch.no_grad():
            for name, value in solution.items():
                leaves[name].copy_(self._transforms[name].inv(value))

    def _advise_inner_cost(self, inner_seconds: float, score_seconds: float) -> None:
        """Warn once (the second update: the first pays one-off costs) when the inner steps
        dominate the step."""
        advice = inner_cost_advice(self.inner_steps, inner_seconds, score_seconds)
        if advice:
            warnings.warn(advice, UserWarning, stacklevel=caller_stacklevel())

    def proximal_problem(
        self, params_t: Params, particles: torch.Tensor, scored: ModelScores
    ) -> ProximalProblem:
        """The step's objective and loss. Non-finite scores are zeroed (the step will be
        rejected); a diagonal Gaussian guide keeps only per-coordinate sums over the
        particles (:func:`~pyro_psvi.objective.fisher_statistics`), so each inner step
        is ``O(D)`` and the ``(S, D)`` particles and scores can be freed; a full-covariance
        guide with a subsampled plate has the split objective
        (:func:`~pyro_psvi.objective.split_full_objective`); a flow's is
        :func:`~pyro_psvi.objective.transport_objective`; a guide with linear scores
        (:attr:`~pyro_psvi.guides.GuideDensity.linear_scores`) has its gradient in closed
        form in its args. The inner steps take it (and the closed-form gradient) times
        :func:`psvi.objective.inner_objective_scale`, the ``-ELBO``'s scale."""
        density, weighting, weights = self.density, self.objective.weighting, scored.weights
        if scored.statistics is not None:  # reduced across ranks
            stats = scored.statistics
            scores_ok = _all_finite(scored.log_joints, stats.cross, stats.score)
            if scores_ok.device.type != "cpu" or not scores_ok:  # read at once on a CPU
                kept = {
                    name: torch.where(scores_ok, getattr(stats, name), 0.0)
                    for name in ("cross", "score", "score_sq")
                }
                stats = stats._replace(**kept)
            scores = None
        else:
            scores_ok, scores = _all_finite(scored.log_joints, scored.scores), scored.scores
            if scores_ok.device.type != "cpu" or not scores_ok:  # read at once on a CPU
                scores = torch.where(scores_ok, scores, torch.zeros_like(scores))
            stats = fisher_statistics(density, params_t, particles, scores)
        averages = self.averages
        terms = elbo_terms(density, params_t, particles, scored.log_joints, weights)
        loss, loss_error = -terms.mean(), terms.std(correction=0) / terms.shape[0] ** 0.5
        with torch.no_grad():
            if stats is None:
                residuals_t = density.score(params_t, particles) - scores
                fisher = residual_fisher(density, params_t, residuals_t, weighting, weights)
            else:
                fisher = diagonal_weighted_fisher(density, params_t, params_t, stats, weighting, weights)
                loc_t, scale_t = density.loc_scale(params_t)
                if self.coarse_layout is not None:
                    estimate = coarse_statistics(
                        self.coarse_layout, loc_t, scale_t, particles, scores, weights
                    )
                    averages = averages._replace(
                        coarse=fold_coarse_statistics(torch, averages.coarse, estimate)
                    )
                particles = scores = None
                averages = self._fold_curvature(averages, curvature_statistics(stats, scale_t), weights)
        # Monte Carlo KLs (user guides) and flows' displacements use common random numbers
        # within the step.
        kl_seed = None if density.closed_form else int(torch.randint(0, 2**62, ()))
        options = {"prox_weight": self.objective.prox_weight, "weighting": weighting, "weights": weights}
        scale = inner_objective_scale(self.objective.prox_weight)
        split_diagonal = path = gradient = solution = None
        if stats is not None:
            split_diagonal = split_diagonal_problem(
                density, params_t, stats, averages.curvature, **options, objective_scale=scale
            )
            gradient = split_diagonal.gradient
        elif density.transport is not None:
            path = transport_path(density, params_t, particles, residuals_t, fisher)
        elif density.linear_scores is not None and weights is None:
            linear = density.linear_scores(params_t, particles, scores)
            if linear is not None and linear.write is not None and self.inner_solver == "closed_form":
                with torch.no_grad():
                    max_kl = math.inf if self.trust_region is None else self._budget(scored.active_dim)
                    update = self.num_score_calls // self.num_particles
                    weight = growing_prox_weight(self.objective.prox_weight, self.prox_weight_growth, update)
                    solved = linear_score_solve(linear, weight, weighting, max_kl)
                    solution = linear.write(*solved)
            elif linear is not None:
                gradient = linear_score_gradient(linear, self.objective.prox_weight, weighting, scale)

        # The closures hold what the inner steps read, not the statistics (5 D-vectors).
        def objective(params: Params) -> torch.Tensor:
            if split_diagonal is not None:
                return split_diagonal.objective(params)[0]  # scaled
            return scale * unscaled_objective(params)

        def unscaled_objective(params: Params) -> torch.Tensor:
            if self.split_covariance:
                return split_full_objective(
                    density, params, params_t, particles, scores,
                    prox_weight=self.objective.prox_weight, weighting=weighting,
                )[0]  # fmt: skip
            if path is not None:
                return transport_objective(
                    density, params, params_t, particles, scores, path,
                    prox_weight=self.objective.prox_weight, weighting=weighting, kl_seed=kl_seed,
                    fisher_weight=self.transport_fisher_weight,
                )[0]  # fmt: skip
            return proximal_objective(
                density, params, params_t, particles, scores, kl_seed=kl_seed, **options
            )[0]

        return ProximalProblem(
            objective, params_t, loss, loss_error, fisher, scored.param_grads, scores_ok, scored.active_dim,
            kl_seed, averages, gradient,
            stats if self.inner_solver == "closed_form" else None, solution,
        )  # fmt: skip

    def _fold_curvature(
        self, averages: RunningAverages, estimate: CurvatureStatistics, weights: torch.Tensor | None
    ) -> RunningAverages:
        """Fold this step's curvature statistics into the running averages of the
        coordinates it saw: a plain mean over the steps so far, then an exponential
        average over the last ``curvature_memory``; a local latent in this step's batch
        counts its visits instead (:func:`psvi.objective.curvature_fold_rates`)."""
        spread = estimate.spread
        seen = torch.ones_like(spread) if weights is None else (weights > 0).to(spread.dtype)
        updates = averages.curvature_updates + seen
        if self._local_coordinates is not None:
            self._local_coordinates = self._local_coordinates.to(spread.device)
        rate = curvature_fold_rates(
            torch, seen, updates, self.curvature_memory, self._local_coordinates, self._local_visits
        )
        curvature = CurvatureStatistics(
            *(old + rate * (new - old) for old, new in zip(averages.curvature, estimate, strict=True))
        )
        return averages._replace(curvature=curvature, curvature_updates=updates)

    def _advance_averages(
        self, problem: ProximalProblem, leaves: dict[str, torch.Tensor], accept: torch.Tensor
    ) -> None:
        """Keep the problem's folded curvature and average the new iterate in (an accepted
        step only; the closed-form step's average restarts where
        :func:`psvi.schedules.restarts_average` says); with iterate averaging, the store
        gets the average and the engine keeps the iterate."""
        averages = problem.averages
        with torch.no_grad():
            if averages.curvature is not None:

                def keep(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
                    return torch.where(accept, new, old)

                averages = averages._replace(
                    curvature=CurvatureStatistics(*map(keep, averages.curvature, self.averages.curvature)),
                    curvature_updates=keep(averages.curvature_updates, self.averages.curvature_updates),
                )
                if averages.coarse is not None:
                    averages = averages._replace(
                        coarse=CoarseStatistics(*map(keep, averages.coarse, self.averages.coarse))
                    )
            iterate = self._iterate
            if iterate is not None:  # out of place: an interrupt restores the old ones
                count, window = averages.params_updates, averages.window
                if window is not None:
                    restart = restarts_average(window, problem.loss, problem.loss_error)
                    count = torch.where(restart, torch.zeros_like(count), count)
                rate = torch.where(accept, iterate_average_rate(count), 0.0)
                iterate = {name: leaf.clone() for name, leaf in leaves.items()}
                params = {
                    name: torch.lerp(averages.params[name], leaf, rate) for name, leaf in leaves.items()
                }
                for name, leaf in leaves.items():
                    leaf.copy_(params[name])
                if window is not None:
                    advanced = window.advanced(problem.loss, problem.loss_error, rate, torch.where)
                    window = LossWindow(*map(partial(torch.where, accept), advanced, window))
                averages = averages._replace(
                    params=params,
                    params_updates=torch.where(accept, count + 1, averages.params_updates),
                    window=window,
                )
        self.averages, self._iterate = averages, iterate

    def inner_fit(self, problem: ProximalProblem, leaves: dict[str, torch.Tensor]) -> list[FlatAdamSteps]:
        """``K`` steps of the user's Pyro optimizer on the guide's params, in place on the
        param-store tensors, and one on the model params: they ascend the expected log
        joint, linearized at ``theta_t``, whose gradient is the particles' mean gradient (no
        score calls), one step of the user's optimizer per update as ``SVI`` takes (their
        objective is linear: ``K`` steps would move them ``K`` times the step size;
        docs/guides.md, "Model params: one optimizer step per update"). Returns the
        steps, whose flat params' Adam moments are not yet written back
        (:meth:`~pyro_psvi._compat.FlatAdamSteps.write_moments`). Where the regime says so
        (:func:`psvi.objective.stops_at_trust_region`), the steps stop after the first whose
        guide is further from ``q_t`` than the trust region's budget (one read of a flag per
        step: a host sync off a CPU, for a flow guide only)."""
        stepped = []
        if self._model_param_names:
            model_leaves = [leaves[name] for name in self._model_param_names]
            with FlatAdamSteps(self.optim, model_leaves, defer_moments=True) as steps:
                steps.step([torch.where(problem.scores_ok, -grad, 0.0) for grad in problem.param_grads])
            stepped.append(steps)
        names = list(self.density.param_names)
        # pyro.module's parameters are read by the module's forward where they are.
        in_place = [names.index(name) for name in self.density.module_param_names]
        with FlatAdamSteps(
            self.optim, [leaves[name] for name in names], in_place, defer_moments=True
        ) as steps:
            flat_gradient = self._flat_guide_gradient(problem, steps, names)
            for _ in range(self.inner_steps):
                if flat_gradient is not None:
                    steps.step_flat(flat_gradient())
                    continue
                steps.step(self._guide_gradients(problem, dict(zip(names, steps.values, strict=True))))
                if self.stops_at_budget and self._past_budget(problem, names, steps.values):
                    break
        return [*stepped, steps]

    def _past_budget(self, problem: ProximalProblem, names: list[str], values: list[torch.Tensor]) -> bool:
        """Whether the guide at the unconstrained ``values`` (of the params ``names``) is
        further from ``q_t`` than the trust region's budget (``density.kl``: a flow's
        displacement)."""
        unconstrained = dict(zip(names, values, strict=True))
        with torch.no_grad():
            kl = self.density.kl(problem.params_t, self._constrain(unconstrained), problem.kl_seed)
            return bool(kl > self._budget(problem.active_dim))

    def _budget(self, active_dim: int) -> float:
        """The trust region's KL budget of a step (``trust_region`` set)."""
        return self.trust_region * active_dim * self.trust_region_scale

    def closed_form_step(
        self,
        problem: ProximalProblem,
        particles: torch.Tensor,
        scored: ModelScores,
        start: dict[str, torch.Tensor],
        leaves: dict[str, torch.Tensor],
        saved_optimizer_state: list[dict[str, torch.Tensor]],
    ) -> tuple[torch.Tensor, RunningAverages]:
        """Write the closed-form step of an autoguide Gaussian
        (:func:`~pyro_psvi.objective.gaussian_proximal_step`,
        :func:`~pyro_psvi.objective.lowrank_proximal_step`,
        :func:`~pyro_psvi.objective.diagonal_proximal_step`) into the guide's ``leaves``,
        in a KL budget of ``trust_region * D`` times the growth of
        :func:`psvi.objective.grow_trust_region` (with averaged iterates:
        :func:`psvi.schedules.progress_budget_scale`, the average restarted while
        :func:`psvi.schedules.far_from_posterior`), accepted as by :meth:`accept`; or, when
        the last step had a grown budget and raised the ``-ELBO`` estimate, write back the
        guide it started from (not a rejection). Returns whether the update counts as
        accepted and the problem's running averages with the growth state for the next
        step and, for a diagonal guide, the curvature average discounted by the KL the
        update travelled (:func:`psvi.objective.discounted_updates`). The
        optimizer's moments are kept."""
        density = self.density
        loc_t, scale_t = self._loc_scale(problem.params_t)
        growth = self.averages.trust
        if growth is None:  # the first step, or a checkpoint saved before the growth existed
            loss = problem.loss
            growth = TrustRegionGrowth(
                torch.ones_like(loss),
                torch.zeros_like(loss, dtype=torch.bool),
                torch.full_like(loss, torch.inf),
                torch.zeros_like(loss),
                loc_t,
                scale_t,
            )
        finite = problem.scores_ok & torch.isfinite(problem.fisher)
        budget_scale, undo = grow_trust_region(*growth[:4], problem.loss, problem.loss_error, finite)
        averages, step_scale = problem.averages, budget_scale
        prox_weight = self.objective.prox_weight
        if averages.window is not None:  # a far fit's average restarts at every update
            step_scale = progress_budget_scale(averages.params_updates, budget_scale)
            if self.progress_prox_weight is not None:  # a lighter weight while the fit progresses
                updates = averages.params_updates
                prox_weight = progress_prox_weight(updates, prox_weight, self.progress_prox_weight)
            count = torch.where(far_from_posterior(budget_scale), 0, averages.params_updates)
            averages = averages._replace(params_updates=count)
        max_kl = torch.inf
        if self.trust_region is not None:
            max_kl = self.trust_region * problem.active_dim * step_scale
        with torch.no_grad():
            if density.loc_tril is not None:
                step = gaussian_proximal_step(loc_t, scale_t, particles, scored.scores, prox_weight, max_kl)
            elif density.loc_lowrank is not None:
                step = lowrank_proximal_step(loc_t, *scale_t, particles, scored.scores, prox_weight, max_kl)
            else:
                step = diagonal_proximal_step(
                    loc_t, scale_t, problem.statistics, problem.averages.curvature, prox_weight,
                    self.objective.weighting, max_kl, scored.weights,
                )  # fmt: skip
            for name, value in self._guide_leaves(step.loc, step.scale).items():
                leaves[name].copy_(value)
        frac = (step.frac > 0).to(problem.loss.dtype)
        accept = self.accept(problem, start, leaves, frac, saved_optimizer_state)
        with torch.no_grad():
            for name, value in self._guide_leaves(growth.loc, growth.guide_scale).items():
                leaves[name].copy_(torch.where(undo, value, leaves[name]))
            taken = accept & ~undo
            growth = growth.advanced(
                taken,
                budget_scale,
                step.frac < 1,
                problem.loss,
                problem.loss_error,
                loc_t,
                scale_t,
                torch.where,
            )
            averages = averages._replace(trust=growth)
            if density.loc_scale is not None:
                loc, scale = density.loc_scale(self._constrain(leaves))
                updates = discounted_updates(torch, averages.curvature_updates, loc_t, scale_t, loc, scale)
                averages = averages._replace(curvature_updates=updates)
            return accept | undo, averages

    def _coarse_correct(
        self, averages: CoarseStatistics, leaves: dict[str, torch.Tensor], accept: torch.Tensor
    ) -> None:
        """Move the accepted step's guide location along the coarse directions
        (:func:`psvi.coarse.coarse_move`), the scales and the optimizer's moments kept."""
        with torch.no_grad():
            loc, scale = self._loc_scale(self._constrain(leaves))
            step = coarse_newton_step(torch, averages)
            moved = loc + coarse_move(torch, self.coarse_layout, loc, scale, step)
            for name, value in self._guide_leaves(moved, scale).items():
                leaves[name].copy_(torch.where(accept, value, leaves[name]))

    def _loc_scale(self, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """An autoguide Gaussian's loc and scale, detached: its sds (diagonal), Cholesky
        factor, or ``(cov_factor, scale)`` pair (low rank)."""
        density = self.density
        loc, scale = (density.loc_scale or density.loc_tril or density.loc_lowrank)(params)
        if isinstance(scale, tuple):
            return loc.detach(), tuple(part.detach() for part in scale)
        return loc.detach(), scale.detach()

    def _guide_leaves(self, loc: torch.Tensor, scale: Any) -> dict[str, torch.Tensor]:
        """The unconstrained leaves of the autoguide Gaussian with ``loc`` and ``scale`` (its
        sds, Cholesky factor or ``(cov_factor, scale)`` pair)."""
        params = self.density.gaussian_params(loc, scale)
        return {name: self._transforms[name].inv(value) for name, value in params.items()}

    def _guide_gradients(
        self, problem: ProximalProblem, unconstrained: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """The objective's gradient in the guide's unconstrained values (of
        ``unconstrained``, by ``density.param_names``): by autograd, or in closed form in
        ``(loc, scale)`` and then by the guide's pullback (:attr:`GuideDensity.loc_scale_vjp`)
        or by autograd through the map from the values to them. Zero where not finite (all
        of it where the objective is not)."""
        values = [unconstrained[name] for name in self.density.param_names]
        pulled = self._pulled_back_gradients(problem, unconstrained)
        if pulled is not None:
            grads, finite = pulled
        elif problem.gradient is None or self.density.loc_scale is None:  # linear scores not gathered
            objective = problem.objective(self._constrain(unconstrained))
            grads = torch.autograd.grad(objective, values)
            finite = torch.isfinite(objective)
        else:
            loc, scale = self.density.loc_scale(self._constrain(unconstrained))
            with torch.no_grad():
                loc_scale_grads = problem.gradient(loc, scale)
                finite = _all_finite(*loc_scale_grads)
            # A user-written guide may hold a scale (or loc) constant, or not use a param.
            moved = [i for i, out in enumerate((loc, scale)) if out.requires_grad]
            grads = torch.autograd.grad(
                [(loc, scale)[i] for i in moved], values, [loc_scale_grads[i] for i in moved],
                allow_unused=True, materialize_grads=True,
            )  # fmt: skip
        # A non-finite gradient must not reach the optimizer's moments (read at once on
        # a CPU, where that is free; elsewhere without waiting for the device): all of it
        # when the objective (or its (loc, scale) gradient) is not finite, else the entries
        # that overflowed in the backward pass (the others still step).
        if finite.device.type != "cpu" or not (finite & _all_finite(*grads)):
            grads = [torch.where(finite & torch.isfinite(grad), grad, 0.0) for grad in grads]
        return list(grads)

    def _pulled_back_gradients(
        self, problem: ProximalProblem, unconstrained: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """The guide's gradients and whether they are finite without an autograd pass,
        where the guide offers a pullback of its ``(loc, scale)`` and every guide param's
        constraint is an elementwise monotone bijection (:func:`_constraint_vjp`); else
        ``None``."""
        density = self.density
        vjps = self._constraint_vjps()
        if problem.gradient is None or density.loc_scale_vjp is None or vjps is None:
            return None
        with torch.no_grad():
            params = {name: self._transforms[name](unconstrained[name]) for name in density.param_names}
            vjp = density.loc_scale_vjp(params)
            if vjp is None:
                return None
            loc, scale, pullback = vjp
            loc_scale_grads = problem.gradient(loc, scale)
            constrained = pullback(*loc_scale_grads)
            grads = []
            for name in density.param_names:
                value, grad = unconstrained[name], constrained.get(name)
                vjp = vjps[name]
                if grad is None:
                    grad = torch.zeros_like(value)
                elif vjp is not None:
                    grad = vjp(grad, value, params[name])
                grads.append(grad)
            return grads, _all_finite(*loc_scale_grads)

    def _flat_guide_gradient(
        self, problem: ProximalProblem, steps: FlatAdamSteps, names: list[str]
    ) -> FlatGuideGradient | None:
        """The inner steps' gradient in the flat layout of ``steps`` (the guide's params
        ``names``; :class:`FlatGuideGradient`), where all of them are stepped as one flat
        tensor, the guide's ``(loc, scale)`` are a gather of them and its constraints
        elementwise kinds; else ``None``."""
        density, layout = self.density, steps.flat_layout()
        if problem.gradient is None or density.loc_scale_index is None or layout is None:
            return None
        if self._constraint_vjps() is None:  # finds the kinds
            return None
        kinds = {name: self._kinds[name] for name in names}
        if any(kind not in ("identity", *_ELEMENTWISE_CONSTRAINTS) for kind in kinds.values()):
            return None
        flat, offsets = layout
        offset_of = dict(zip(names, offsets, strict=True))
        reads = density.loc_scale_index(offset_of, flat.device)
        if reads is None:
            return None
        sizes = [value.numel() for value in steps.values]
        layout_key = (tuple(offsets), tuple(sizes), tuple(kinds.items()), flat.dtype)
        with torch.no_grad():
            cached = self._flat_sides
            if cached is None or cached[0] is not reads or cached[1] != layout_key:
                in_order = dict.fromkeys(kinds.values())
                masks = {kind: torch.zeros_like(flat, dtype=torch.bool) for kind in in_order}
                for name, offset, size in zip(names, offsets, sizes, strict=True):
                    masks[kinds[name]][offset : offset + size] = True
                sides = flat_sides(reads, masks)
                self._flat_sides = cached = (
                    reads,
                    layout_key,
                    sides,
                    _tiling(sides, flat.numel()),
                    torch.empty_like(flat),
                )
            _, _, sides, tiling, total = cached
        return FlatGuideGradient(sides, total, tiling, flat, problem.gradient)

    def _constraint_vjps(self) -> dict[str, Callable | None] | None:
        """By guide param, the vector-Jacobian product of its constraint transform
        (:func:`_constraint_vjp`), or ``None`` when some transform is not an elementwise
        monotone bijection: what :meth:`_pulled_back_gradients` needs. Finds the
        transforms' kinds (:func:`_constraint_kind`, ``self._kinds``) with them, for
        :meth:`_flat_guide_gradient`."""
        if not self._vjps_found:
            names = self.density.param_names
            try:
                transforms = [self._transforms[name] for name in names]
                self._kinds = dict(zip(names, map(_constraint_kind, transforms), strict=True))
                self._vjps = {
                    name: _constraint_vjp(transform, self._kinds[name])
                    for name, transform in zip(names, transforms, strict=True)
                }
            except NotImplementedError:
                self._kinds, self._vjps = None, None
            self._vjps_found = True
        return self._vjps

    def unread_entries(
        self, start: dict[str, torch.Tensor], particles: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """For a user-written guide with local latents, by guide param, the entries its
        ``log q`` at the particles does not read (zero gradient: the params of the members
        outside the mini-batch); ``None`` for other guides."""
        density = self.density
        if density.plate_indices is None or not any(site.plates for site in density.sites):
            return None
        with torch.enable_grad():
            unconstrained = {name: start[name].detach().requires_grad_(True) for name in density.param_names}
            log_q = density.log_prob(self._constrain(unconstrained), particles).sum()
            grads = torch.autograd.grad(log_q, list(unconstrained.values()), allow_unused=True)
        # pyro.module parameters read their own tensors (no gradient to these copies):
        # shared by every member, they are never held.
        return {
            name: torch.ones_like(leaf, dtype=torch.bool) if grad is None else grad == 0
            for (name, leaf), grad in zip(unconstrained.items(), grads, strict=True)
            if name not in density.module_param_names
        }

    def hold(
        self,
        unread: dict[str, torch.Tensor] | None,
        start: dict[str, torch.Tensor],
        leaves: dict[str, torch.Tensor],
    ) -> None:
        """Put the ``unread`` entries (:meth:`unread_entries`) back at their ``start``.

        Their objective gradient is zero, but the optimizer's momentum moves them, and the
        proximal term, a KL over the batch's members, cannot pull them back (AutoNormal's
        closed-form KL over the full plate does): docs/guides.md measures the drift. The
        optimizer's moments are kept."""
        if unread is None:
            return
        with torch.no_grad():
            for name, mask in unread.items():
                leaves[name].copy_(torch.where(mask, start[name], leaves[name]))

    def pull_back(
        self, problem: ProximalProblem, start: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The fraction of the step from ``start`` to the fitted ``leaves`` to take: the
        largest of ``1, 1/2, 1/4, ...`` with ``KL(q_t || q_frac) <= trust_region *
        active_dim`` (times :attr:`trust_region_scale`; 0 rejects the step; without
        a trust region, 1 when that KL is finite). Read lazily on a CPU, chosen on the
        device elsewhere (no host sync)."""
        with torch.no_grad():
            fitted = {name: leaves[name].detach() for name in self.density.param_names}
            finite = None
            if self.density.runs_guide:
                # A user's guide may validate its distributions' args: a non-finite fitted
                # guide (an overflowing step) is rejected without running the guide at it.
                # (Read at once on a CPU, where that is free; elsewhere without waiting.)
                finite = _all_finite(*fitted.values())
                if finite.device.type != "cpu" or not finite:
                    fitted = {name: torch.where(finite, value, start[name]) for name, value in fitted.items()}

            def kl_at(frac: float) -> torch.Tensor:  # the guide's params: the model's step is whole
                moved = {name: torch.lerp(start[name], value, frac) for name, value in fitted.items()}
                return self.density.kl(problem.params_t, self._constrain(moved), problem.kl_seed)

            loss = problem.loss
            if self.trust_region is None:
                frac = torch.isfinite(kl_at(1.0)).to(loss.dtype)
            else:
                frac = trust_region_fraction(
                    kl_at, self._budget(problem.active_dim), self.max_halvings, lazy=loss.device.type == "cpu"
                )
            frac = torch.as_tensor(frac, dtype=loss.dtype, device=loss.device)
            return frac if finite is None else torch.where(finite.to(loss.device), frac, 0.0)

    def accept(
        self,
        problem: ProximalProblem,
        start: dict[str, torch.Tensor],
        leaves: dict[str, torch.Tensor],
        frac: torch.Tensor,
        saved_optimizer_state: list[dict[str, torch.Tensor] | None],
        pending_moments: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Move the guide's params the fraction ``frac`` of their step and the model params
        the whole step (theirs is the user's optimizer's, as ``SVI``'s: the guide's trust
        region does not bound it), or restore them and the optimizer's state exactly when
        the step is rejected (no fraction qualified, or non-finite scores, loss, params or
        optimizer moments, ``pending_moments`` (those not yet written back) included; state
        a first step created goes back to zeros, i.e. a fresh optimizer). Returns the
        accept flag (device tensor)."""
        with torch.no_grad():
            accept = (frac > 0) & problem.scores_ok
            accept &= torch.isfinite(problem.fisher) & torch.isfinite(problem.loss)
            # The optimizer's moments too: a finite step can leave Adam's second moment at
            # inf (a gradient beyond 1.8e19 squared, float32), spoiling every later step.
            current = self._optimizer_state(list(leaves.values()))
            moments = [value for state in current for value in state.values()]
            accept &= _all_finite(*leaves.values(), *moments, *pending_moments)
            if self.reducer is not None:  # every rank accepts or rejects the same step
                accept = self.reducer.agree(accept)
            # Read at once on a CPU, where that is free: a whole accepted step keeps the
            # fitted params and the optimizer's state as they are (lerp at 1 is exact).
            if accept.device.type == "cpu" and accept and frac == 1:
                return accept
            for name, leaf in leaves.items():
                moved = leaf if name in self._model_param_names else torch.lerp(start[name], leaf, frac)
                leaf.copy_(torch.where(accept, moved, start[name]))
            self._restore_optimizer_state(current, saved_optimizer_state, accept)
        return accept

    def _optimizer_state(self, leaves: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The tensors of the torch optimizer state of each leaf (empty before its first step)."""
        states = []
        for leaf in leaves:
            optimizer = torch_optimizer(self.optim, leaf)
            state = {} if optimizer is None else optimizer.state.get(leaf, {})
            states.append({k: v for k, v in state.items() if torch.is_tensor(v)})
        return states

    @staticmethod
    def _restore_optimizer_state(
        current: list[dict[str, torch.Tensor]],
        saved: list[dict[str, torch.Tensor] | None],
        keep: torch.Tensor,
    ) -> None:
        """Unless ``keep``, put the optimizer's ``current`` state (:meth:`_optimizer_state`)
        back to ``saved`` (state created since goes to zeros: a fresh optimizer's); a
        ``None`` in ``saved`` (a state stepped on flat copies) is left as it is."""
        for before, after in zip(saved, current, strict=True):
            if before is None:
                continue
            for key, value in after.items():
                old = before.get(key, torch.zeros_like(value))
                value.copy_(torch.where(keep.to(value.device), value, old))

    def _optimizer_state_copy(
        self, leaves: dict[str, torch.Tensor], flat: bool
    ) -> list[dict[str, torch.Tensor] | None]:
        """A copy of each leaf's optimizer state; with ``flat``, ``None`` for those the
        inner steps step on flat copies (:func:`~pyro_psvi._compat.flat_adam_state`)."""
        states = self._optimizer_state(list(leaves.values()))
        return [
            None
            if flat and flat_adam_state(self.optim, leaf) is not None
            else {k: v.clone() for k, v in state.items()}
            for leaf, state in zip(leaves.values(), states, strict=True)
        ]
