"""``ProximalScoreVI``: a drop-in replacement for :class:`numpyro.infer.SVI`.

One update is four phases, each a method (docs/algorithm.md):

1. :meth:`~ScoreEngine.score_particles`: ``S`` particles from the current guide
   ``q_t`` and their mini-batch model scores (one vectorized pass);
2. :meth:`ProximalScoreVI.inner_fit`: ``K`` optimizer steps on the proximal
   score-matching objective (:meth:`ProximalScoreVI.proximal_problem`), one on the
   model's params;
3. :meth:`ProximalScoreVI.pull_back`: the fraction of the step that keeps
   ``KL(q_t || q_new) <= trust_region * D`` (halving; times the regime's
   :func:`~psvi.objective.trust_region_scale` when the model subsamples a plate);
4. :meth:`ProximalScoreVI.accept`: a step whose scores, objective or parameters are
   not finite is rejected (the previous parameters and optimizer state are kept and
   ``EngineState.num_rejected`` counts it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import optax
from jax import lax, random
from jax.sharding import Mesh

from numpyro_psvi._compat import param_transforms, with_entries_of, with_params, with_step_count
from numpyro_psvi.engine import EngineState, ScoreEngine
from numpyro_psvi.guides import (
    GuideDensity,
    antithetic,
    local_coordinates,
    local_plate_sizes,
    particle_blocks,
)
from numpyro_psvi.objective import (
    CurvatureStatistics,
    FisherStatistics,
    coarse_statistics,
    curvature_statistics,
    diagonal_proximal_step,
    diagonal_weighted_fisher,
    elbo_terms,
    fisher_statistics,
    gaussian_proximal_step,
    lerp_tree,
    linear_score_solve,
    lowrank_proximal_step,
    proximal_objective,
    residual_fisher,
    split_diagonal_objective,
    split_full_objective,
    transport_objective,
    transport_path,
    trust_region_fraction,
)
from numpyro_psvi.scores import ModelScores
from psvi.checkpoint import warn_if_inner_scale_changed
from psvi.checks import caller_stacklevel, check_proximal_options
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


class RunningAverages(NamedTuple):
    """What :class:`ProximalScoreVI` averages across updates (``None`` where unused).

    Attributes
    ----------
    curvature : CurvatureStatistics or None
        Diagonal Gaussian guides: the statistics of the per-coordinate curvature
        (:class:`~numpyro_psvi.objective.CurvatureStatistics`) averaged over the last
        ``curvature_memory`` updates (all of them while fewer); a local latent's over its
        last few visits (:func:`psvi.objective.local_curvature_visits`).
    curvature_updates : jax.Array or None
        How many updates saw each coordinate (a local latent only when its data are in
        the mini-batch); after closed-form steps, discounted by the KL they travelled
        (:func:`psvi.objective.discounted_updates`).
    params, params_updates
        With iterate averaging: the unconstrained params averaged over accepted
        updates, iterate ``i`` weighted by ``i^5`` (Polyak-Ruppert averaging that forgets
        the start: the first half of a run carries 1.6% of the weight), and the number
        of updates averaged since the average (re)started.
    trust : TrustRegionGrowth or None
        The closed-form step's KL budget growth (:class:`psvi.objective.TrustRegionGrowth`).
    window : LossWindow or None
        The closed-form step with iterate averaging: the ``-ELBO`` estimates of the
        averaged iterates (:class:`psvi.schedules.LossWindow`), which restart the average
        while the fit progresses (:func:`psvi.schedules.restarts_average`).
    coarse : CoarseStatistics or None
        With the coarse correction: its projected gradient and curvature averaged over
        the last updates (:class:`psvi.coarse.CoarseStatistics`).
    """

    curvature: CurvatureStatistics | None
    curvature_updates: jax.Array | None
    params: dict | None
    params_updates: jax.Array
    trust: TrustRegionGrowth | None = None
    window: LossWindow | None = None
    coarse: CoarseStatistics | None = None


class ProximalProblem(NamedTuple):
    """One update's proximal problem: ``objective(unconstrained) -> (value, terms)``
    over all params (guide and model); ``loss``, the ``-ELBO`` estimate of ``q_t`` from
    the update's particles (:func:`~numpyro_psvi.objective.elbo_terms`), and
    ``loss_error`` its standard error; ``fisher``, its weighted Fisher divergence on
    them; ``averages``, the running averages with this update's curvature estimate
    folded in; ``statistics``, a diagonal Gaussian guide's
    :class:`~numpyro_psvi.objective.FisherStatistics` (else ``None``); ``solution``, with
    the closed-form solver, the constrained guide params that solve the problem of a
    guide with linear scores exactly (:func:`~numpyro_psvi.objective.linear_score_solve`;
    else ``None``)."""

    objective: Callable[[dict], tuple[jax.Array, dict]]
    loss: jax.Array
    loss_error: jax.Array
    fisher: jax.Array
    averages: RunningAverages
    statistics: FisherStatistics | None = None
    solution: dict | None = None


class ProximalScoreVI(ScoreEngine):
    """Proximal score-based variational inference (Kim, arXiv:2602.05873).

    Use it where you would use ``SVI(model, guide, optim, Trace_ELBO())``::

        svi = ProximalScoreVI(model, guide, numpyro.optim.Adam(1e-2))
        result = svi.run(random.PRNGKey(0), 2000, X, y)
        guide.sample_posterior(random.PRNGKey(1), result.params, sample_shape=(100,))

    Parameters
    ----------
    model : callable
        A NumPyro model. Mini-batches come from its own
        ``numpyro.plate(..., subsample_size=B)``; the plate's ``N/B`` scale makes the
        scores unbiased.
    guide : numpyro.infer.autoguide.AutoGuide or callable
        AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
        AutoLowRankMultivariateNormal (closed-form scores), any AutoContinuous guide
        with a tractable density (e.g. AutoIAFNormal: a flow's update, docs/algorithm.md),
        or a user-written guide with one ``numpyro.sample`` site per latent site (nested
        autodiff, Monte Carlo KL).
    optim
        A ``numpyro.optim`` optimizer or an optax ``GradientTransformation``.
    loss : psvi.ProximalScoreMatching, optional
        The objective (``prox_weight``, ``weighting``, ``num_kl_draws``), in the place
        where ``SVI`` takes its ELBO; the default is ``ProximalScoreMatching()``.
    num_particles : int
        Particles ``S`` per update, hence score calls per update.
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
        Per-dimension KL budget: each update is pulled back toward ``q_t`` until
        ``KL(q_t || q_new) <= trust_region * D``, times a factor when the model
        subsamples (:func:`psvi.objective.trust_region_scale`): 5 for AutoNormal and
        AutoDiagonalNormal (at most ``N/B``), whose averaged guide settles better when
        each update moves less than the batch's noise would carry it (docs/minibatch.md
        section 10), 1 for a flow guide (its returned average of network weights
        needs small moves, docs/guides.md), 1 for a guide that amortizes its local
        latents (:func:`psvi.objective.amortizes_locals`: an update moves every member),
        and ``N/B`` (the largest ratio of a plate's
        size to its subsample size) for other guides: mini-batch noise alone moves each
        update by a KL that grows like ``N/B``. With exact scores, the closed-form step
        of a full-covariance Gaussian guide grows its budget (up to 2^30 times) while
        its steps pay off and undoes a grown step that did not
        (:func:`psvi.objective.grow_trust_region`): fits that start far from the
        posterior otherwise crawl; with iterate averaging its
        budget is at least 2.5 times the default while the fit progresses
        (:func:`psvi.schedules.progress_budget_scale`). ``None`` turns the trust region off.
    vectorize_particles : bool
        Score the particles in one batched pass (``vmap``, the default) or one pass per
        particle (``lax.map``, as Pyro's ``vectorize_particles=False``): batched
        convolutions over per-particle weights can be slow on CPU; which is faster
        depends on the network (docs/scale.md).
    score_method : {"closed_form", "autodiff"}
        How the guide's score is computed for Gaussian guides.
    max_halvings : int
        Trust-region halvings before the step is rejected (the optimizer path; the
        closed-form step bisects for the largest fraction that fits, down to 2^-120).
    max_consecutive_rejections : int or None
        :meth:`run` raises once this many updates in a row were rejected (``None``:
        never); it checks at the end of each progress-bar chunk, or at the end.
    average_iterates : bool or None
        Return the running average of the iterates (:class:`RunningAverages`) from
        :meth:`get_params` and :meth:`run`, while the updates continue from the last
        iterate. ``None`` (the default): on for a flow (with a trust region, or with
        mini-batch scores), for any other guide when the model subsamples a plate, whose
        mini-batch noise moves every iterate, and for the
        closed-form step of a full-covariance Gaussian guide (``inner_solver``); off
        otherwise. With the closed-form step the average
        restarts at the iterate while the fit progresses
        (:func:`psvi.schedules.restarts_average`, and at every update while its trust
        region has grown far: :func:`psvi.schedules.far_from_posterior`); with the
        default ``prox_weight`` (3 there) it settles the iterates that wander about a
        non-Gaussian posterior, follows them on Gaussian ones and on far starts
        (docs/gaussian_study.md, "Averaged iterates"). A checkpoint saved with the other
        setting is refused by name.
    data_parallel : bool, jax.sharding.Mesh or None
        Split each mini-batch over the devices of a one-axis mesh, every device taking
        the same updates (docs/data_parallel.md): ``True`` for all of ``jax.devices()``;
        ``None`` (the default): on in a multi-process run (``jax.distributed``), else off.
    inner_solver : {"closed_form", "optimizer"} or None
        How each proximal problem is solved: ``"closed_form"`` for an autoguide
        Gaussian (:func:`~numpyro_psvi.objective.gaussian_proximal_step` for a full
        covariance, the split objective solved in ``q_t``'s whitened coordinates;
        :func:`~numpyro_psvi.objective.lowrank_proximal_step` for
        AutoLowRankMultivariateNormal, that solution projected onto its family;
        :func:`~numpyro_psvi.objective.diagonal_proximal_step` for AutoNormal and
        AutoDiagonalNormal, coordinate by coordinate; the step the largest fraction in
        the trust region, which grows while its steps pay off; the optimizer then holds
        the guide's params but does not move them), or ``"optimizer"`` (``inner_steps``
        steps of ``optim``). ``None`` (the default): the closed form where it is the
        default (:func:`psvi.objective.resolve_inner_solver`: a full or low-rank
        covariance, exact scores, no model params) unless ``inner_steps`` is given. For a
        mean-field user guide whose Beta, Gamma, InverseGamma, LogNormal or Normal sites
        read their args from its params (found once, :func:`~numpyro_psvi.guides._linear_reads`),
        ``"closed_form"`` is the exact solve of each update
        (:func:`~numpyro_psvi.objective.linear_score_solve`), the default with exact scores
        and the weight ``10 N/B`` on request with a subsampled plate.
    antithetic_particles : bool or None
        Draw the ``S`` particles of a Gaussian guide in antithetic pairs: ``ceil(S / 2)``
        draws and the first ``floor(S / 2)`` reflected about the guide's mean (each still a
        draw of ``q_t``, their mean ``q_t``'s for even ``S``), which removes the
        particles' common shift from each update's location fit (:func:`~numpyro_psvi.guides.antithetic`;
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
        to each accepted update a hundredth of a Newton step on a coarse space (each local
        slot's shift and dilation, and the globals coupled to them), its gradient and
        curvature averaged from the updates' own particles (:mod:`psvi.coarse`; no score
        call more). A diagonal guide otherwise crawls along the directions only the
        priors pin (a GLMM's mean against its intercepts' mean) at a small learning rate:
        on crossed random effects at Adam(1e-3) it brings ``mu`` from 5-11 to within 0.2
        of the optimum's sds in 3,000 updates; at Adam(1e-2), where the fits had arrived,
        its noise costs some accuracy, the random effects' scales arrive more slowly
        and a robust BNN predicted worse (docs/minibatch.md section 19). Off by default.
    reshuffle : bool
        Draw the mini-batches of the model's subsampled plates by random reshuffling
        (:mod:`numpyro_psvi.batches`: every member once per epoch, as
        ``DataLoader(shuffle=True, drop_last=True)``) rather than independently, as the
        plate alone does; its averaged iterates converge far faster (docs/minibatch.md
        section 9). No effect on models without a subsampled plate.
    **static_kwargs
        Static keyword arguments for the model and guide, as in ``SVI``.
    """

    def __init__(
        self,
        model: Callable,
        guide: Any,
        optim: Any,
        loss: ProximalScoreMatching | None = None,
        *,
        num_particles: int = 4,
        inner_steps: int | None = None,
        prox_weight: float | None = None,
        weighting: str | None = None,
        trust_region: float | None = 0.02,
        vectorize_particles: bool = True,
        score_method: str = "closed_form",
        max_halvings: int = 12,
        max_consecutive_rejections: int | None = 20,
        average_iterates: bool | None = None,
        data_parallel: bool | Mesh | None = None,
        reshuffle: bool = True,
        inner_solver: str | None = None,
        antithetic_particles: bool | None = None,
        orthogonal_particles: bool | None = None,
        coarse_correction: bool = False,
        **static_kwargs: Any,
    ) -> None:
        objective = resolve_objective(loss, prox_weight, weighting)
        check_proximal_options(inner_steps, trust_region)
        super().__init__(
            model, guide, optim, num_particles=num_particles,
            vectorize_particles=vectorize_particles, score_method=score_method,
            num_kl_draws=objective.num_kl_draws,
            max_consecutive_rejections=max_consecutive_rejections, data_parallel=data_parallel,
            reshuffle=reshuffle, **static_kwargs,
        )  # fmt: skip
        self.objective = objective
        self._requested = (inner_steps, average_iterates, objective.curvature_memory, objective.prox_weight)
        self.trust_region_scale = 1.0  # the KL budget's regime factor, set up with the regime
        self.split_covariance = False  # a full-covariance guide's split objective, likewise
        self.transport_fisher_weight = TRANSPORT_FISHER_WEIGHT  # a flow's Fisher term's, likewise
        self.stops_at_budget = False  # whether the inner steps stop past the budget, likewise
        self._requested_solver = check_inner_solver(inner_solver)
        self._requested_antithetic = antithetic_particles
        self._requested_orthogonal = orthogonal_particles
        self._requested_coarse = coarse_correction
        self.coarse_layout: CoarseLayout | None = None  # set up with the regime
        self.inner_solver = "optimizer"  # set up with the regime
        self.gaussian_step = False  # likewise
        self.inner_steps = inner_steps
        self.trust_region = trust_region
        self.max_halvings = int(max_halvings)
        self.average_iterates = average_iterates
        self.curvature_memory = objective.curvature_memory
        self._local_coordinates: jax.Array | None = None  # set up with the regime
        self._local_visits = 1  # likewise (psvi.objective.local_curvature_visits)

    def init(self, rng_key: jax.Array, *args: Any, init_params: dict | None = None, **kwargs: Any):
        """Return the initial :class:`EngineState` (see :meth:`ScoreEngine.init`), with a
        warning where the guide family advises against these settings; refuse an optimizer
        that cannot do here what it does under ``SVI`` (``optax.MultiSteps``; ``Minimize``
        with model params)."""
        state = super().init(rng_key, *args, init_params=init_params, **kwargs)
        if _accumulates_gradients(state.optim_state):
            raise ValueError(
                "optax.MultiSteps accumulates gradients over optimizer steps, and the engine's "
                "optimizer steps are each update's inner steps on one mini-batch (and a model "
                "param's one step per update), not updates over mini-batches: it would not "
                "accumulate what it does under SVI. For larger batches raise the plate's "
                "subsample_size; pass the inner optimizer (e.g. optax.adam) itself."
            )
        if self._model_param_names and isinstance(self.optim, numpyro.optim.Minimize):
            raise ValueError(
                "numpyro.optim.Minimize solves each update's proximal problem, but the model's "
                f"params {list(self._model_param_names)} have no minimum there (their objective "
                "in an update is linear: they take one optimizer step per update, as under SVI). "
                "Use a stepping optimizer (numpyro.optim.Adam, an optax transformation)."
            )
        diagonal = self.density.loc_scale is not None
        gaussian = diagonal or self.family.full_covariance
        transport = self.density.transport is not None
        bounded = self.trust_region is not None  # a budget the steps can stop at
        guide_shapes = [
            jnp.shape(leaf)
            for name, value in self.optim.get_params(state.optim_state).items()
            if name not in self._model_param_names
            for leaf in jax.tree.leaves(value)
        ]
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
            has_model_params=bool(self._model_param_names), data_parallel=self.mesh is not None,
            linear_step=self.density.linear_scores is not None,
        )  # fmt: skip
        # The closed form of an autoguide Gaussian (closed_form_update) rather than a guide
        # with linear scores' exact solve (linear_score_solve, in update).
        self.gaussian_step = self.inner_solver == "closed_form" and self.density.gaussian_params is not None
        self.antithetic_particles = resolve_antithetic(
            self._requested_antithetic, antithetic(self.density) is not None
        )
        blocks = particle_blocks(self.density, self._subsampled_plates)
        design = None if blocks is None else orthogonal_design(blocks, self.num_particles)
        self.particle_design = resolve_orthogonal(self._requested_orthogonal, design)
        movable = blocks is not None and self.density.gaussian_params is not None
        layout = resolve_coarse(self._requested_coarse, coarse_layout(blocks if movable else None))
        self.coarse_layout = (
            None if layout is None else CoarseLayout(*map(jnp.asarray, layout[:3]), *layout[3:])
        )
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
        zeros = jnp.zeros(self.density.latent_dim)
        curvature = CurvatureStatistics(zeros, zeros) if diagonal else None
        updates = zeros if curvature is not None else None
        params = self.optim.get_params(state.optim_state) if self.average_iterates else None
        trust = window = None
        if self.gaussian_step:
            loc, scale = self._loc_scale(self._iterate_params(state))
            # Strongly typed as the update's values are: a weak type would recompile it.
            start = (jnp.ones((), loc.dtype), jnp.zeros((), bool), jnp.full((), jnp.inf, loc.dtype))
            trust = TrustRegionGrowth(*start, jnp.zeros((), loc.dtype), loc, scale)
            if params is not None:
                window = LossWindow(start[2], jnp.zeros((), loc.dtype))
        coarse = None
        if self.coarse_layout is not None:
            coarse = empty_coarse_statistics(
                lambda shape: jnp.zeros(shape, zeros.dtype), self.coarse_layout, jnp.zeros((), jnp.int32)
            )
        averages = RunningAverages(
            curvature, updates, params, jnp.zeros((), jnp.int32), trust, window, coarse
        )
        return state._replace(averages=averages)

    def _checkpoint_header(self, state: EngineState) -> dict:
        scale = inner_objective_scale(self.objective.prox_weight)
        return {**super()._checkpoint_header(state), "inner_objective_scale": scale}

    def _check_resumed(self, saved_header: dict) -> None:
        if self.inner_solver == "optimizer":  # the closed-form steps do not step it
            warn_if_inner_scale_changed(saved_header.get("inner_objective_scale"), self.objective.prox_weight)

    def get_params(self, state: EngineState) -> dict:
        """Constrained guide params, exactly as ``SVI.get_params`` returns them: the averaged
        iterate where iterates are averaged (``average_iterates``)."""
        if self.constrain_fn is None:
            raise RuntimeError("Call ProximalScoreVI.init(rng_key, *args) (or run) first.")
        if state.averages is not None and state.averages.params is not None:
            return self.constrain_fn(state.averages.params)
        return self._iterate_params(state)

    def _iterate_params(self, state: EngineState) -> dict:
        """Constrained params of the current iterate, from which the next update starts."""
        return self.constrain_fn(self.optim.get_params(state.optim_state))

    def _model_params(self, state: EngineState) -> dict:
        unconstrained = self.optim.get_params(state.optim_state)
        return {name: unconstrained[name] for name in self._model_param_names}

    # ---------------------------------------------------------------- update
    def update(self, state: EngineState, *args: Any, **kwargs: Any) -> tuple[EngineState, jax.Array]:
        """One iteration: ``S`` score calls and ``K`` inner optimizer steps (pure, jittable).

        Returns
        -------
        (EngineState, jax.Array)
            The next state and the loss, as ``SVI``'s: the ``-ELBO`` estimate of ``q_t``
            from this update's ``S`` particles and mini-batch (no extra score call); NaN
            when the update was rejected. The weighted Fisher divergence the update
            minimizes is :meth:`~numpyro_psvi.ScoreEngine.fisher_divergence`.
        """
        self._warn_if_eager(state)
        kwargs, density = self._prepare(args, kwargs)
        rng_key, key_particles, key_batch, key_kl = random.split(state.rng_key, 4)
        params_t = self._iterate_params(state)
        density, indices = self.on_batch(density, self.batch_indices(state), key_batch, args, kwargs)
        particles, scored = self.score_particles(
            density, params_t, self._model_params(state), key_particles, key_batch, args, kwargs,
            indices=indices, statistics=True,
        )  # fmt: skip
        update = state.num_score_calls // self.num_particles  # the updates before this one
        problem = self.proximal_problem(density, params_t, particles, scored, key_kl, state.averages, update)
        if self.gaussian_step:
            return self.closed_form_update(state, density, params_t, particles, scored, problem, rng_key)
        if problem.solution is not None:  # solved: the optimizer holds the params, its moments kept
            fitted = self._with_params(state.optim_state, problem.solution)
        else:
            stop = self._budget(scored.active_dim) if self.stops_at_budget else None
            fitted = self.inner_fit(
                problem.objective, state.optim_state, density, params_t, key_kl, stop,
                model_steps=update - state.num_rejected,  # the updates that stepped the model params
            )  # fmt: skip
        if density.at_indices is not None:  # a user guide's local latents
            fitted = self.hold_unread(density, particles, state.optim_state, fitted)
        if problem.solution is None:
            frac = self.pull_back(density, params_t, state.optim_state, fitted, scored.active_dim, key_kl)
        else:  # within the budget by construction (the solve's weight ladder), finite
            frac = jnp.ones_like(problem.loss)
        return self.accept(state, fitted, frac, problem, scored, rng_key)

    def proximal_problem(
        self,
        density: GuideDensity,
        params_t: dict,
        particles: jax.Array,
        scored: ModelScores,
        key_kl: jax.Array,
        averages: RunningAverages,
        update: jax.Array,
    ) -> ProximalProblem:
        """The update's objective over the unconstrained params, and its loss.

        A diagonal Gaussian guide needs the particles only through per-coordinate
        sums (:func:`~numpyro_psvi.objective.fisher_statistics`), each inner step is
        ``O(D)``, and its objective is the split one
        (:func:`~numpyro_psvi.objective.split_diagonal_objective`) with the curvature
        averaged over updates; a full-covariance one with a subsampled plate has the split
        objective :func:`~numpyro_psvi.objective.split_full_objective`; a flow's is
        :func:`~numpyro_psvi.objective.transport_objective`; the optimizer steps on it
        times :func:`psvi.objective.inner_objective_scale` (the ``-ELBO``'s scale). Model
        params ascend the expected log joint, linearized at ``theta_t``: their gradient is
        the particles' mean gradient (no score calls). ``update`` counts the updates before
        this one (the exact solve's growing weight, :func:`psvi.schedules.growing_prox_weight`).
        """
        weighting, weights = self.objective.weighting, scored.weights
        stats = scored.statistics  # reduced across devices
        if stats is None:
            stats = fisher_statistics(density, params_t, particles, scored.scores)
        terms = elbo_terms(density, params_t, particles, scored.log_joints, weights)
        loss, loss_error = -jnp.mean(terms), jnp.std(terms) / jnp.sqrt(terms.shape[0])
        path = None
        if stats is None:
            residuals_t = jax.vmap(density.score, (None, 0))(params_t, particles) - scored.scores
            fisher = residual_fisher(density, params_t, residuals_t, weighting, weights)
            if density.transport is not None:
                path = transport_path(density, params_t, particles, residuals_t, fisher)
        else:
            fisher = diagonal_weighted_fisher(density, params_t, params_t, stats, weighting, weights)
            loc_t, scale_t = density.loc_scale(params_t)
            averages = self._fold_curvature(averages, curvature_statistics(stats, scale_t), weights)
            if self.coarse_layout is not None:
                estimate = coarse_statistics(
                    self.coarse_layout, loc_t, scale_t, particles, scored.scores, weights
                )
                averages = averages._replace(coarse=fold_coarse_statistics(jnp, averages.coarse, estimate))

        def objective(unconstrained):
            params = self.constrain_fn(unconstrained)
            options = {"prox_weight": self.objective.prox_weight, "weighting": weighting, "weights": weights}
            if stats is None and self.split_covariance:
                value, terms = split_full_objective(
                    density, params, params_t, particles, scored.scores,
                    prox_weight=self.objective.prox_weight, weighting=weighting,
                )  # fmt: skip
            elif path is not None:
                value, terms = transport_objective(
                    density, params, params_t, particles, scored.scores, path, key_kl,
                    prox_weight=self.objective.prox_weight, weighting=weighting,
                    fisher_weight=self.transport_fisher_weight,
                )  # fmt: skip
            elif stats is None:
                value, terms = proximal_objective(
                    density, params, params_t, particles, scored.scores, key_kl, **options
                )
            else:
                value, terms = split_diagonal_objective(
                    density, params, params_t, stats, averages.curvature, **options
                )
            value = value * inner_objective_scale(self.objective.prox_weight)
            for name, grad in scored.param_grads.items():
                products = jax.tree.map(jnp.vdot, lax.stop_gradient(grad), unconstrained[name])
                value = value - sum(jax.tree.leaves(products))
            return value, terms

        solution = None
        if density.linear_scores is not None and self.inner_solver == "closed_form":
            budget = None if self.trust_region is None else self._budget(scored.active_dim)
            linear = density.linear_scores(params_t, particles, scored.scores)
            weight = growing_prox_weight(self.objective.prox_weight, self.prox_weight_growth, update)
            solution = linear.write(*linear_score_solve(linear, weight, weighting, budget))
        return ProximalProblem(objective, loss, loss_error, fisher, averages, stats, solution)

    def _fold_curvature(
        self, averages: RunningAverages, estimate: CurvatureStatistics, weights: jax.Array | None
    ) -> RunningAverages:
        """Fold this update's curvature statistics into the running averages of the
        coordinates it saw: a plain mean over the updates so far, then an exponential
        average over the last ``curvature_memory``; a local latent in this update's batch
        counts its visits instead (:func:`psvi.objective.curvature_fold_rates`)."""
        seen = (
            jnp.ones_like(estimate.spread) if weights is None else (weights > 0).astype(estimate.spread.dtype)
        )
        updates = averages.curvature_updates + seen
        rate = curvature_fold_rates(
            jnp, seen, updates, self.curvature_memory, self._local_coordinates, self._local_visits
        )
        curvature = jax.tree.map(lambda old, new: old + rate * (new - old), averages.curvature, estimate)
        return averages._replace(curvature=curvature, curvature_updates=updates)

    def inner_fit(
        self,
        objective: Callable,
        optim_state: Any,
        density: GuideDensity,
        params_t: dict,
        key_kl: jax.Array,
        max_kl: jax.Array | float | None = None,
        model_steps: jax.Array | int = 0,
    ) -> Any:
        """``K`` steps of the user's optimizer on ``objective`` (no host round trip); the
        optimizer state carries over between updates. With ``max_kl``, the steps stop
        after the first whose guide is more than ``max_kl`` from ``q_t`` (``density.kl``
        from ``params_t``, a flow's displacement: :func:`psvi.objective.stops_at_trust_region`).
        Model params take one step of the user's optimizer per update, as ``SVI`` takes,
        counted as their ``model_steps``-th (their objective is linear, so ``K`` steps
        would move them ``K`` times the step size; docs/guides.md, "Model params: one
        optimizer step per update"): their values and optimizer state are what that step
        made of them."""

        def value(unconstrained):  # no auxiliary output: numpyro.optim.Minimize refuses one
            return objective(unconstrained)[0], None

        def inner_step(optim_state):
            return self.optim.eval_and_update(value, optim_state)[1]

        def distance(optim_state):
            return density.kl(params_t, self.constrain_fn(self.optim.get_params(optim_state)), key_kl)

        def within(carry):
            step, _, kl = carry
            return (step < self.inner_steps) & ~(kl > max_kl)

        def body(carry):
            step, optim_state, _ = carry
            optim_state = inner_step(optim_state)
            return step + 1, optim_state, distance(optim_state)

        def steps(optim_state, done: int):
            """The steps after the first ``done`` (stopped past ``max_kl`` if given)."""
            if max_kl is None:
                return lax.fori_loop(done, self.inner_steps, lambda _, state: inner_step(state), optim_state)
            kl = jnp.zeros(()) if done == 0 else distance(optim_state)
            return lax.while_loop(within, body, (jnp.asarray(done), optim_state, kl))[1]

        if not self._model_param_names:
            return steps(optim_state, 0)
        # Traced apart: the model params' step, at their own step count (Adam's bias
        # correction, a schedule), as SVI's; the guide's at the optimizer's (K per update).
        params = self.optim.get_params(optim_state)
        loss, grads = jax.value_and_grad(lambda params: objective(params)[0])(params)
        first = self.optim.update(grads, optim_state, value=loss)
        model_step = self.optim.update(grads, with_step_count(optim_state, model_steps), value=loss)
        return with_entries_of(steps(first, 1), model_step, self._model_param_names)

    def closed_form_update(
        self,
        state: EngineState,
        density: GuideDensity,
        params_t: dict,
        particles: jax.Array,
        scored: ModelScores,
        problem: ProximalProblem,
        rng_key: jax.Array,
    ) -> tuple[EngineState, jax.Array]:
        """The closed-form step of an autoguide Gaussian
        (:func:`~numpyro_psvi.objective.gaussian_proximal_step`,
        :func:`~numpyro_psvi.objective.diagonal_proximal_step`) in a KL budget of
        ``trust_region * D`` times the growth of :func:`psvi.objective.grow_trust_region`
        (with averaged iterates: :func:`psvi.schedules.progress_budget_scale`, the average
        restarted while :func:`psvi.schedules.far_from_posterior`),
        accepted as by :meth:`accept`; or, when the last step had a grown budget and raised
        the ``-ELBO`` estimate, the guide it started from, restored (not a rejection: the
        loss is this update's estimate). The optimizer holds the params and keeps its
        moments. A diagonal guide's curvature average is discounted by the KL the update
        travelled (:func:`psvi.objective.discounted_updates`)."""
        growth = state.averages.trust
        finite = jnp.isfinite(problem.fisher) & jnp.all(jnp.isfinite(scored.log_joints))
        scale, undo = grow_trust_region(*growth[:4], problem.loss, problem.loss_error, finite)
        loc_t, scale_t = self._loc_scale(params_t)
        budget_scale, prox_weight = scale, self.objective.prox_weight
        if state.averages.window is not None:  # a far fit's average restarts at every update
            budget_scale = progress_budget_scale(state.averages.params_updates, scale)
            if self.progress_prox_weight is not None:  # a lighter weight while the fit progresses
                updates = state.averages.params_updates
                prox_weight = progress_prox_weight(updates, prox_weight, self.progress_prox_weight)
            count = jnp.where(far_from_posterior(scale), 0, problem.averages.params_updates)
            problem = problem._replace(averages=problem.averages._replace(params_updates=count))
        max_kl = jnp.inf
        if self.trust_region is not None:
            max_kl = self.trust_region * scored.active_dim * budget_scale
        if density.loc_tril is not None:
            step = gaussian_proximal_step(loc_t, scale_t, particles, scored.scores, prox_weight, max_kl)
        elif density.loc_lowrank is not None:
            step = lowrank_proximal_step(loc_t, *scale_t, particles, scored.scores, prox_weight, max_kl)
        else:
            step = diagonal_proximal_step(
                loc_t, scale_t, problem.statistics, problem.averages.curvature, prox_weight,
                self.objective.weighting, max_kl, scored.weights,
            )  # fmt: skip
        taken, loss = self.accept(
            state, self._with_guide(state.optim_state, step.loc, step.scale),
            jnp.where(step.frac > 0, 1.0, 0.0), problem, scored, rng_key,
        )  # fmt: skip
        accepted = jnp.isfinite(loss)
        taken_growth = growth.advanced(
            accepted, scale, step.frac < 1, problem.loss, problem.loss_error, loc_t, scale_t, jnp.where
        )
        restored = (
            self._with_guide(state.optim_state, growth.loc, growth.guide_scale),
            state.averages._replace(trust=growth._replace(scale=jnp.ones(()), last_cut=jnp.zeros((), bool))),
        )
        optim_state, averages = jax.tree.map(
            lambda back, on: jnp.where(undo, back, on),
            restored, (taken.optim_state, taken.averages._replace(trust=taken_growth)),
        )  # fmt: skip
        if density.loc_scale is not None:
            loc, scale = self._loc_scale(self.constrain_fn(self.optim.get_params(optim_state)))
            updates = discounted_updates(jnp, averages.curvature_updates, loc_t, scale_t, loc, scale)
            averages = averages._replace(curvature_updates=updates)
        new_state = taken._replace(
            optim_state=optim_state, averages=averages,
            num_rejected=jnp.where(undo, state.num_rejected, taken.num_rejected),
            consecutive_rejected=jnp.where(undo, 0, taken.consecutive_rejected),
        )  # fmt: skip
        return new_state, jnp.where(undo, problem.loss, loss)

    def _loc_scale(self, params: dict) -> tuple[jax.Array, Any]:
        """An autoguide Gaussian's loc and scale: its sds (diagonal), Cholesky factor, or
        ``(cov_factor, scale)`` pair (low rank)."""
        return (self.density.loc_scale or self.density.loc_tril or self.density.loc_lowrank)(params)

    def _with_guide(self, optim_state: Any, loc: jax.Array, scale: Any) -> Any:
        """``optim_state`` holding the autoguide Gaussian with ``loc`` and ``scale`` (its sds,
        Cholesky factor or ``(cov_factor, scale)`` pair; the optimizer's moments kept)."""
        transforms = param_transforms(self.constrain_fn)
        unconstrained = dict(self.optim.get_params(optim_state))
        for name, value in self.density.gaussian_params(loc, scale).items():
            unconstrained[name] = transforms[name].inv(value)
        return with_params(optim_state, unconstrained)

    def _with_params(self, optim_state: Any, constrained: dict) -> Any:
        """``optim_state`` holding the guide params ``constrained`` (the others and the
        optimizer's moments kept)."""
        transforms = param_transforms(self.constrain_fn)
        unconstrained = dict(self.optim.get_params(optim_state))
        for name, value in constrained.items():
            unconstrained[name] = transforms[name].inv(value)
        return with_params(optim_state, unconstrained)

    def hold_unread(
        self, density: GuideDensity, particles: jax.Array, optim_state_t: Any, fitted: Any
    ) -> Any:
        """``fitted`` with the guide params the update's guide does not read (a
        user-written guide's params of the members outside the mini-batch: zero gradient
        of ``log q`` at the particles) back at their values in ``optim_state_t``, the
        moments kept; the model's params as fitted.

        Their objective gradient is zero, but the optimizer's momentum moves them, and the
        proximal term, a KL over the batch's members, cannot pull them back (AutoNormal's
        closed-form KL over the full plate does): docs/guides.md measures the drift."""
        unconstrained_t = self.optim.get_params(optim_state_t)

        def log_q(unconstrained):
            params = self.constrain_fn(unconstrained)
            return jnp.sum(jax.vmap(density.log_prob, (None, 0))(params, particles))

        read = jax.grad(log_q)(unconstrained_t)
        fitted_params = self.optim.get_params(fitted)
        held = {
            name: value if name in self._model_param_names
            else jax.tree.map(lambda grad, new, old: jnp.where(grad != 0, new, old),
                              read[name], value, unconstrained_t[name])
            for name, value in fitted_params.items()
        }  # fmt: skip
        return with_params(fitted, held)

    def pull_back(
        self,
        density: GuideDensity,
        params_t: dict,
        optim_state_t: Any,
        fitted: Any,
        active_dim: int,
        key_kl: jax.Array,
    ) -> jax.Array:
        """The fraction of the step from ``q_t`` to the fitted guide to take: the largest of
        ``1, 1/2, 1/4, ...`` with ``KL(q_t || q_frac) <= trust_region * active_dim``
        (times :attr:`trust_region_scale`; 0 rejects the step; without a trust
        region, 1 when that KL is finite)."""
        unconstrained_t = self.optim.get_params(optim_state_t)
        unconstrained_new = self.optim.get_params(fitted)

        def kl_at(frac):
            moved = lerp_tree(unconstrained_t, unconstrained_new, frac)
            return density.kl(params_t, self.constrain_fn(moved), key_kl)

        if self.trust_region is None:
            return jnp.where(jnp.isfinite(kl_at(jnp.asarray(1.0))), 1.0, 0.0)
        return trust_region_fraction(kl_at, self._budget(active_dim), self.max_halvings)

    def _coarse_corrected(self, optim_state: Any, averages: CoarseStatistics) -> Any:
        """``optim_state`` with its guide's location moved along the coarse directions
        (:func:`psvi.coarse.coarse_move`), the scales and the optimizer's moments kept."""
        loc, scale = self._loc_scale(self.constrain_fn(self.optim.get_params(optim_state)))
        step = coarse_newton_step(jnp, averages)
        return self._with_guide(
            optim_state, loc + coarse_move(jnp, self.coarse_layout, loc, scale, step), scale
        )

    def _budget(self, active_dim: int) -> float:
        """The trust region's KL budget of an update (``trust_region`` set)."""
        return self.trust_region * active_dim * self.trust_region_scale

    def accept(
        self,
        state: EngineState,
        fitted: Any,
        frac: jax.Array,
        problem: ProximalProblem,
        scored: ModelScores,
        rng_key: jax.Array,
    ) -> tuple[EngineState, jax.Array]:
        """Move the guide's optimizer state (params and moments) the fraction ``frac``
        toward the fitted one, the model params' the whole way (their step is the user's
        optimizer's, as ``SVI``'s: the guide's trust region does not bound it), and advance
        the running averages; or keep the old state exactly when the step is rejected (no
        fraction qualified, or non-finite scores, loss, params or optimizer moments); as
        ``SVI.stable_update`` does, a rejected step reports a NaN loss."""
        loss = problem.loss
        accept = (frac > 0) & jnp.isfinite(problem.fisher) & jnp.isfinite(loss)
        accept &= jnp.all(jnp.isfinite(scored.log_joints))
        # The whole optimizer state: a finite step can leave Adam's second moment at inf
        # (a gradient beyond 1.8e19 squared, float32), which would spoil every later step.
        accept &= _all_finite(fitted)
        candidate = lerp_tree(state.optim_state, fitted, frac)
        if self._model_param_names:
            candidate = with_entries_of(candidate, fitted, self._model_param_names)
        averages = problem.averages
        if averages.coarse is not None:
            candidate = self._coarse_corrected(candidate, averages.coarse)
        if averages.params is not None:
            count = averages.params_updates
            if averages.window is not None:
                count = jnp.where(restarts_average(averages.window, loss, problem.loss_error), 0, count)
            rate = iterate_average_rate(count)
            averages = averages._replace(
                params=lerp_tree(averages.params, self.optim.get_params(candidate), rate),
                params_updates=count + 1,
            )
            if averages.window is not None:
                averages = averages._replace(
                    window=averages.window.advanced(loss, problem.loss_error, rate, jnp.where)
                )
        averages = jax.tree.map(lambda old, new: jnp.where(accept, new, old), state.averages, averages)
        state = self.record(state, candidate, accept, rng_key)._replace(averages=averages)
        return state, jnp.where(accept, loss, jnp.nan)


def _accumulates_gradients(optim_state: Any) -> bool:
    """Whether an optimizer state holds an ``optax.MultiSteps`` accumulation."""

    def is_accumulation(node: Any) -> bool:
        return isinstance(node, optax.MultiStepsState)

    return any(map(is_accumulation, jax.tree.leaves(optim_state, is_leaf=is_accumulation)))


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating entry of ``tree`` is finite (0-dim bool)."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
