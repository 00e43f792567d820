"""What every NumPyro engine fitting a guide from model scores shares.

:class:`ScoreEngine` holds the set-up (model checks, the guide's family and density,
the guide's params collected by NumPyro's own ``SVI.init``), the score phase
(:meth:`ScoreEngine.score_particles`), the bookkeeping of an accepted or rejected
update, :meth:`ScoreEngine.run` and :meth:`ScoreEngine.evaluate`, over one
:class:`EngineState`. Subclasses write :meth:`ScoreEngine.update`:
:class:`~numpyro_psvi.ProximalScoreVI`, :class:`~numpyro_psvi.GSM` and
:class:`~numpyro_psvi.BaM`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import tqdm
from jax import lax, random
from jax.sharding import Mesh
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.svi import SVIRunResult

from numpyro_psvi._compat import device_varying, shard_map
from numpyro_psvi.batches import advance_epoch_order, batch_indices, init_epoch_order
from numpyro_psvi.enumeration import enumerated_log_density, enumerated_sites
from numpyro_psvi.guides import GuideDensity, antithetic, guide_family, orthogonal
from numpyro_psvi.objective import fisher_statistics, negative_elbo, weighted_fisher
from numpyro_psvi.parallel import ShardedPlates, resolve_mesh
from numpyro_psvi.scores import (
    ModelScores,
    at_random_values,
    batch_ratio,
    check_model,
    coordinate_weights,
    draw_plate_indices,
    guess_max_plate_nesting,
    latent_shapes,
    local_latents,
    make_score_and_param_grad_fn,
    make_score_fn,
    masked_latents,
    model_param_names,
    subsampled_plates,
    unmodelled_scores,
)
from psvi import checkpoint
from psvi.checks import (
    caller_stacklevel,
    check_checkpointing,
    check_global_batch,
    check_latents_match,
    check_rejection_rate,
    check_rejection_streak,
    data_parallel_local_message,
    local_latent_message,
    no_mini_batch_message,
    rejection_message,
    rising_loss_message,
)
from psvi.designs import OrthogonalDesign
from psvi.families import DensityOptions

# Folded into a key to draw the epochs' permutations: a stream of its own, so that the
# particles' and the plates' draws stay what they are without reshuffling.
_EPOCH_STREAM = 0x0E90C4


class EngineState(NamedTuple):
    """State of every NumPyro engine.

    Attributes
    ----------
    optim_state
        :class:`~numpyro_psvi.ProximalScoreVI`: the optimizer's state (it holds the
        unconstrained guide and model params). GSM and BaM, whose closed-form updates
        need no optimizer: the constrained guide params.
    rng_key : jax.Array
        Key for the next update.
    num_score_calls : jax.Array
        Model score evaluations made so far (``num_particles`` per update).
    num_rejected : jax.Array
        Updates rejected because a score, the objective or the new parameters were
        not finite (the state was left as it was).
    consecutive_rejected : jax.Array
        Length of the current run of rejected updates (0 after an accepted one).
    averages
        Running averages an engine keeps across updates
        (:class:`~numpyro_psvi.proximal.RunningAverages`), or ``None``.
    epoch_order
        Where each subsampled plate is in its epoch
        (:class:`~numpyro_psvi.batches.EpochOrder`), or ``None`` without reshuffling.
    """

    optim_state: Any
    rng_key: jax.Array
    num_score_calls: jax.Array
    num_rejected: jax.Array
    consecutive_rejected: jax.Array
    averages: Any = None
    epoch_order: Any = None


class ScoreEngine:
    """Set-up, scores, counters and ``run`` of the NumPyro score-based engines.

    Parameters
    ----------
    model, guide
        A NumPyro model and a guide of a registered family
        (:func:`numpyro_psvi.guides.guide_family`).
    optim
        A ``numpyro.optim`` optimizer or an optax ``GradientTransformation``; the
        closed-form engines pass ``None``.
    num_particles : int
        Particles ``S`` per update, hence score calls per update.
    vectorize_particles : bool
        Score the particles in one batched pass (``vmap``) or one pass per particle
        (``lax.map``).
    score_method : {"closed_form", "autodiff"}
        How the guide's score is computed for Gaussian guides.
    num_kl_draws : int
        Draws for the Monte Carlo KL of guides without a closed form, and base draws
        for a flow guide's displacement.
    max_consecutive_rejections : int or None
        :meth:`run` raises once this many updates in a row were rejected (``None``:
        never); it checks at the end of each progress-bar chunk, or at the end.
    data_parallel : bool, jax.sharding.Mesh or None
        Split each mini-batch over the devices of a one-axis mesh
        (:mod:`numpyro_psvi.parallel`, docs/data_parallel.md): ``True`` for all of
        ``jax.devices()``; ``None``: on in a multi-process run, else off.
    reshuffle : bool
        Draw the mini-batches of the model's subsampled plates by random reshuffling
        (:mod:`numpyro_psvi.batches`: every member once per epoch, as
        ``DataLoader(shuffle=True, drop_last=True)``) rather than independently, as the
        plate alone does. No effect on models without a subsampled plate.
    **static_kwargs
        Static keyword arguments for the model and guide, as in ``SVI``.
    """

    def __init__(
        self,
        model: Callable,
        guide: Any,
        optim: Any,
        *,
        num_particles: int,
        vectorize_particles: bool = True,
        score_method: str = "closed_form",
        num_kl_draws: int = 256,
        max_consecutive_rejections: int | None = 20,
        data_parallel: bool | Mesh | None = None,
        reshuffle: bool = True,
        **static_kwargs: Any,
    ) -> None:
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}.")
        self.family = guide_family(guide)
        self.family.check_supported()
        self.model = model
        self.guide = guide
        # NumPyro's SVI converts the optimizer (numpyro.optim, jax or optax) and
        # collects the guide params and their constraints in init.
        self._svi = SVI(model, guide, optim or numpyro.optim.SGD(0.0), Trace_ELBO(), **static_kwargs)
        self.optim = self._svi.optim
        self.num_particles = int(num_particles)
        self.antithetic_particles = False  # a Gaussian guide's particles in reflected pairs
        self.particle_design: OrthogonalDesign | None = None  # or from an orthogonal design
        self._subsampled_plates: frozenset[str] = frozenset()  # those local latents sit in
        self.vectorize_particles = bool(vectorize_particles)
        self.density_options = DensityOptions(score_method, int(num_kl_draws))
        self.max_consecutive_rejections = max_consecutive_rejections
        self.static_kwargs = static_kwargs
        self.constrain_fn: Callable | None = None
        self.density: GuideDensity | None = None
        self._build_density: Callable[[tuple, dict], GuideDensity] | None = None
        self._latent_shapes: dict | None = None
        self._model_param_names: tuple[str, ...] = ()
        self.batch_ratio = 1.0  # the model's largest plate size over subsample size
        self.mesh = resolve_mesh(data_parallel)
        self.reshuffle = bool(reshuffle)
        self._epoch_plates: dict[str, tuple[int, int]] = {}  # {plate: (size, global batch)}
        self._warned_eager = False  # an update called outside jax.jit was warned of
        self._masked_sites: tuple[str, ...] = ()  # latent sites whose density the model masks
        self._enumerate_nesting: int | None = None  # the plate nesting of a model with enumerated sites

    # ----------------------------------------------------------------- set-up
    def init(self, rng_key: jax.Array, *args: Any, init_params: dict | None = None, **kwargs: Any):
        """Return the initial :class:`EngineState` (runs the guide once to set it up).

        Parameters
        ----------
        rng_key : jax.Array
            Random key.
        *args, **kwargs
            Model and guide arguments.
        init_params : dict, optional
            Constrained initial values for some guide params, as in ``SVI.init``.
        """
        _, model_seed, guide_seed = random.split(rng_key, 3)  # the split SVI.init makes
        all_kwargs = {**kwargs, **self.static_kwargs}
        model_trace = check_model(self.model, model_seed, args, all_kwargs)
        local = local_latents(model_trace)
        self._masked_sites = masked_latents(model_trace)
        if enumerated_sites(model_trace):  # summed out of the scores' log joint
            self._enumerate_nesting = guess_max_plate_nesting(model_trace)
            # Traced once abstractly: a model that cannot be summed out says so now.
            at_random = at_random_values(self.model, model_seed)
            jax.eval_shape(
                lambda: enumerated_log_density(at_random, args, all_kwargs, self._enumerate_nesting)
            )
        self._model_param_names = model_param_names(self.model, args, all_kwargs)
        self.batch_ratio = batch_ratio(self.model, args, all_kwargs)
        if self.mesh is not None:
            self._check_data_parallel(local, args, all_kwargs)
            # The global batch is R devices' batches: the global N/B is a device's over R.
            self.batch_ratio = self.batch_ratio / self.mesh.size
        self._check_local_latents(local)
        self._subsampled_plates = frozenset(local.values())
        self._check_model_params()
        self._build_density = self.family.setup(
            self.guide, self.model, args, all_kwargs, self.density_options
        )
        with warnings.catch_warnings():
            # SVI's init (run only to set up the guide's params) warns of a discrete site;
            # the engine sums such sites out of its scores.
            warnings.filterwarnings("ignore", "Currently, SVI with Trace_ELBO loss does not support")
            svi_state = self._svi.init(rng_key, *args, init_params=init_params, **kwargs)
        self.constrain_fn = self._svi.constrain_fn
        self._latent_shapes = latent_shapes(self.model, args, all_kwargs)
        prototype = getattr(self.guide, "prototype_trace", None)
        if prototype is not None:  # an autoguide (a user-written guide's setup checked its sites)
            check_latents_match(
                _sample_shapes(prototype), self._latent_shapes,
                "The guide was built for another model: its latent sites differ from this model's",
                "Build the guide from the model you fit, e.g. AutoNormal(model).",
            )  # fmt: skip
        optim_state = svi_state.optim_state
        if self.family.init_params is not None:
            params = self.family.init_params(
                self.guide, self.optim.get_params(optim_state), init_params, guide_seed
            )
            optim_state = self.optim.init(params)
        self.density = self._build_density(args, all_kwargs)
        zero = jnp.zeros((), jnp.int32)
        self._epoch_plates = self._global_plates(args, all_kwargs) if self.reshuffle else {}
        epoch_order = None
        if self._epoch_plates:
            epoch_order = init_epoch_order(self._epoch_plates, random.fold_in(rng_key, _EPOCH_STREAM))
        optim_state = self._initial_optim_state(optim_state)
        return EngineState(optim_state, svi_state.rng_key, zero, zero, zero, epoch_order=epoch_order)

    def _global_plates(self, args: tuple, kwargs: dict) -> dict[str, tuple[int, int]]:
        """``{plate name: (size, global batch)}`` of the model's subsampled plates (the
        global batch: the devices' batches together)."""
        world_size = 1 if self.mesh is None else self.mesh.size
        plates = subsampled_plates(self.model, args, kwargs)
        return {name: (size, world_size * batch) for name, (size, batch) in plates.items()}

    def batch_indices(self, state: EngineState) -> dict[str, jax.Array] | None:
        """``{plate name: indices}`` of the global mini-batch of the update from ``state``
        (``None`` without reshuffling: the plates draw their own)."""
        if state.epoch_order is None:
            return None
        return batch_indices(state.epoch_order, self._epoch_plates)

    def _check_data_parallel(self, local: dict[str, str], args: tuple, kwargs: dict) -> None:
        """Data parallelism needs a mini-batch to split, small enough, and no local latents."""
        if local:
            raise NotImplementedError(data_parallel_local_message(*next(iter(local.items())), "device"))
        plates = subsampled_plates(self.model, args, kwargs)
        if not plates:
            raise ValueError(no_mini_batch_message("numpyro", "device"))
        for name, (size, subsample_size) in plates.items():
            check_global_batch(name, size, subsample_size, self.mesh.size, "device")

    def _check_local_latents(self, local: dict[str, str]) -> None:
        """Local latents in a subsampled plate (``{site: plate}``) need a guide whose params
        span the plate's full size (AutoNormal)."""
        if local and not self.family.local_latents:
            name, plate = next(iter(local.items()))
            raise NotImplementedError(local_latent_message(name, plate, self.family.name))

    def _check_model_params(self) -> None:
        """Engines that cannot learn ``numpyro.param`` sites of the model refuse them here."""

    def _initial_optim_state(self, optim_state: Any) -> Any:
        """What the engine keeps in :attr:`EngineState.optim_state`, from SVI's."""
        return optim_state

    def _prepare(self, args: tuple, kwargs: dict) -> tuple[dict, GuideDensity]:
        """This call's keyword arguments (static ones merged) and the guide's density;
        checks that the arguments keep the latent shapes fixed at :meth:`init`."""
        if self.constrain_fn is None:
            raise RuntimeError(f"Call {type(self).__name__}.init(rng_key, *args) (or run) first.")
        kwargs = {**kwargs, **self.static_kwargs}
        check_latents_match(
            self._latent_shapes, latent_shapes(self.model, args, kwargs),
            "With these arguments the model's latent sites differ from those at init",
            "Call init again with the new arguments: the guide's shapes are fixed there.",
        )  # fmt: skip
        if self._epoch_plates:
            plates = self._global_plates(args, kwargs)
            if plates != self._epoch_plates:
                raise ValueError(
                    f"With these arguments the model's subsampled plates (name: (size, "
                    f"batch)) are {plates}, and the epochs of reshuffle=True were drawn at "
                    f"init for {self._epoch_plates}. Call init again with the new "
                    "arguments, or pass reshuffle=False to let the plates draw their own "
                    "batches."
                )
        return kwargs, self._build_density(args, kwargs)

    def get_params(self, state: EngineState) -> dict:
        """Constrained guide params, exactly as ``SVI.get_params`` returns them."""
        raise NotImplementedError

    # ----------------------------------------------------------------- phases
    def score_particles(
        self,
        density: GuideDensity,
        params: dict,
        model_params: dict,
        key_particles: jax.Array,
        key_batch: jax.Array,
        args: tuple,
        kwargs: dict,
        *,
        indices: dict[str, jax.Array] | None = None,
        statistics: bool = False,
    ) -> tuple[jax.Array, ModelScores]:
        """``S`` particles from the guide at constrained ``params`` (constants), and their
        :class:`~numpyro_psvi.scores.ModelScores` from one pass (or one per particle)
        sharing one mini-batch: the global batch ``indices`` (:meth:`batch_indices`) or,
        when ``None``, the plates' own draw from ``key_batch``; ``model_params`` are the
        model's unconstrained ``numpyro.param`` values (their mean gradient comes along).
        ``statistics``: see :meth:`reduce_scores`."""
        if self.particle_design is not None:
            drawn = orthogonal(density, self.particle_design)
        else:
            drawn = antithetic(density) if self.antithetic_particles else density
        particles = lax.stop_gradient(drawn.sample(params, key_particles, self.num_particles))
        if self.mesh is None:
            scored = self._model_scores(
                self.model, density, particles, model_params, key_batch, indices, args, kwargs
            )
            return particles, self._where_unmodelled(density, params, particles, scored)
        axis = self.mesh.axis_names[0]
        model = ShardedPlates(self.model, axis_name=axis, world_size=self.mesh.size)
        static = {}

        def on_device(particles, params: dict, model_params: dict, key_batch: jax.Array, indices):
            # Varying over the devices: each device's gradients are of its own share.
            at = device_varying((particles, model_params), axis)
            scored = self._model_scores(model, density, *at, key_batch, indices, args, kwargs)
            reduced = self.reduce_scores(density, params, particles, scored, statistics)
            arrays, static["rest"] = _split_static(reduced)
            return arrays

        replicated = jax.sharding.PartitionSpec()
        arrays = shard_map(on_device, self.mesh, replicated, replicated)(
            particles, params, model_params, key_batch, indices
        )
        scored = _merge_static(arrays, static["rest"])
        return particles, self._where_unmodelled(density, params, particles, scored)

    def _where_unmodelled(
        self, density: GuideDensity, params: dict, particles: jax.Array, scored: ModelScores
    ) -> ModelScores:
        """``scored`` with ``q_t``'s own scores where a masked site's entry has no density
        in the model (:func:`~numpyro_psvi.scores.unmodelled_scores`); a diagonal guide's
        reduced statistics (data parallel) are left as they are."""
        if not self._masked_sites or scored.scores is None:
            return scored
        zeros = jnp.zeros(density.latent_dim, particles.dtype)
        values, pull_back = jax.vjp(density.unpack, zeros)
        masked = pull_back({name: jnp.full(jnp.shape(value), name in self._masked_sites, zeros.dtype)
                            for name, value in values.items()})[0] > 0  # fmt: skip
        guide_scores = jax.vmap(density.score, (None, 0))(params, particles)
        return scored._replace(scores=unmodelled_scores(scored.scores, guide_scores, masked))

    def _model_scores(
        self,
        model: Callable,
        density: GuideDensity,
        particles: jax.Array,
        model_params: dict,
        key_batch: jax.Array,
        indices: dict[str, jax.Array] | None,
        args: tuple,
        kwargs: dict,
    ) -> ModelScores:
        """The :class:`~numpyro_psvi.scores.ModelScores` of ``particles`` on ``model``'s
        mini-batch ``indices``, or of ``key_batch`` when ``None``."""
        local_plates = density.local_plates
        if indices is None and local_plates:
            plates = subsampled_plates(model, args, kwargs)
            indices = draw_plate_indices(plates, key_batch) if plates else None
        if not model_params:
            score_fn = make_score_fn(
                model, density.unpack, args, kwargs, local_plates, self.vectorize_particles,
                self._enumerate_nesting,
            )  # fmt: skip
            log_joints, scores = score_fn(particles, key_batch, indices)
            param_grads = {}
        else:
            score_fn = make_score_and_param_grad_fn(
                model, density.unpack, self.constrain_fn, args, kwargs, local_plates,
                self.vectorize_particles, self._enumerate_nesting,
            )  # fmt: skip
            log_joints, scores, param_grads = score_fn(particles, model_params, key_batch, indices)
        weights, active_dim = None, density.latent_dim
        if local_plates:
            # In the flat layout's order (unpack's; an AutoGuideList's is its parts'), which
            # eval_shape's dict (sorted by name) would lose.
            shapes = {name: jnp.shape(value) for name, value in density.unpack(particles[0]).items()}
            weights, active_dim = coordinate_weights(local_plates, shapes, indices or {})
        if weights is not None:
            # A local latent's own score came out N/B times too large (plate scale).
            scores = scores / jnp.where(weights > 0, weights, 1.0)
        return ModelScores(log_joints, scores, param_grads, weights, active_dim)

    def reduce_scores(
        self,
        density: GuideDensity,
        params: dict,
        particles: jax.Array,
        scored: ModelScores,
        statistics: bool = False,
    ) -> ModelScores:
        """Inside ``shard_map``: the mean over the devices of the scores of their shares
        of the mini-batch, in one ``pmean`` of the log joints, scores and param gradients.

        With ``statistics`` and a diagonal Gaussian guide, the two score-dependent
        :class:`~numpyro_psvi.objective.FisherStatistics` are reduced in place of the
        ``(S, D)`` scores (``2 D`` floats; the particles, hence the other sums, are the
        same on every device) and returned in ``statistics``, the scores as ``None``.
        """
        axis = self.mesh.axis_names[0]
        if statistics and density.loc_scale is not None:
            stats = fisher_statistics(density, params, particles, scored.scores)
            log_joints, cross, score, param_grads = lax.pmean(
                (scored.log_joints, stats.cross, stats.score, scored.param_grads), axis
            )
            # sum_s g_s^2 is not a mean over devices; it enters only the reported Fisher
            # value, which then drops the (constant) spread of the scores around their mean.
            stats = stats._replace(cross=cross, score=score, score_sq=score**2 / stats.count)
            return scored._replace(
                log_joints=log_joints, scores=None, param_grads=param_grads, statistics=stats
            )
        log_joints, scores, param_grads = lax.pmean(
            (scored.log_joints, scored.scores, scored.param_grads), axis
        )
        return scored._replace(log_joints=log_joints, scores=scores, param_grads=param_grads)

    def record(
        self, state: EngineState, candidate: Any, accept: jax.Array, rng_key: jax.Array
    ) -> EngineState:
        """The next state: ``candidate`` if ``accept``, else the old one exactly; the
        counters advanced."""
        optim_state = jax.tree.map(lambda old, new: jnp.where(accept, new, old), state.optim_state, candidate)
        epoch_order = state.epoch_order
        if epoch_order is not None:
            key = random.fold_in(rng_key, _EPOCH_STREAM)
            epoch_order = advance_epoch_order(epoch_order, self._epoch_plates, key)
        return state._replace(
            optim_state=optim_state,
            rng_key=rng_key,
            epoch_order=epoch_order,
            num_score_calls=state.num_score_calls + self.num_particles,
            num_rejected=state.num_rejected + (~accept).astype(jnp.int32),
            consecutive_rejected=jnp.where(accept, 0, state.consecutive_rejected + 1),
        )

    def update(self, state: EngineState, *args: Any, **kwargs: Any) -> tuple[EngineState, jax.Array]:
        """One update (pure, jittable): the next state and the update's loss (NaN when
        the update was rejected)."""
        raise NotImplementedError

    def _warn_if_eager(self, state: EngineState) -> None:
        """Warn once when an update runs outside a trace (``jax.jit``, ``lax.scan``): its
        ``lax`` loops are traced and compiled again at every such call."""
        if self._warned_eager or isinstance(state.rng_key, jax.core.Tracer):
            return
        self._warned_eager = True
        warnings.warn(
            f"{type(self).__name__}.update ran outside jax.jit: its inner loops are compiled "
            "again at every such call (about half a second each on a small model). Compile it "
            "once, as for SVI.update: update = jax.jit(svi.update), or use svi.run(...).",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )

    def stable_update(
        self, state: EngineState, *args: Any, forward_mode_differentiation: bool = False, **kwargs: Any
    ) -> tuple[EngineState, jax.Array]:
        """:meth:`update` under ``SVI.stable_update``'s name and signature: every update
        is stable (one whose scores, loss, params or optimizer state are not finite is
        rejected: the params and optimizer state passed are kept, ``num_rejected``
        counts it and the loss is NaN)."""
        self._refuse_forward_mode(forward_mode_differentiation)
        return self.update(state, *args, **kwargs)

    def _refuse_forward_mode(self, forward_mode_differentiation: bool) -> None:
        if forward_mode_differentiation:
            raise NotImplementedError(
                f"{type(self).__name__} takes the model's scores as reverse-mode gradients "
                "(jax.grad); forward_mode_differentiation=True (for models with "
                "lax.while_loop) is not supported. Rewrite the loop with lax.scan or "
                "lax.fori_loop with static bounds."
            )

    # --------------------------------------------------------- run, evaluate
    def evaluate(self, state: EngineState, *args: Any, **kwargs: Any) -> jax.Array:
        """The ``-ELBO`` estimate of the current guide from fresh particles, as
        ``SVI.evaluate`` returns it (the key that the next :meth:`update` would use).

        Costs ``num_particles`` score calls (not counted in the state).
        """
        density, params, particles, scored = self._fresh_scores(state, args, kwargs)
        return negative_elbo(density, params, particles, scored.log_joints, scored.weights)

    def fisher_divergence(self, state: EngineState, *args: Any, **kwargs: Any) -> jax.Array:
        """The covariance-weighted Fisher divergence of the current guide on fresh
        particles, ``(1/S) sum_s r_s' Cov_q r_s`` with ``r_s`` the difference of the
        guide's and the model's scores (zero exactly when they match), which the updates
        drive down. Same particles and cost as :meth:`evaluate`."""
        density, params, particles, scored = self._fresh_scores(state, args, kwargs)
        scores, weights = scored.scores, scored.weights
        return weighted_fisher(density, params, params, particles, scores, "covariance", weights)

    def _fresh_scores(self, state: EngineState, args: tuple, kwargs: dict) -> tuple:
        kwargs, density = self._prepare(args, kwargs)
        _, key_particles, key_batch, _ = random.split(state.rng_key, 4)
        params = self.get_params(state)
        density, indices = self.on_batch(density, self.batch_indices(state), key_batch, args, kwargs)
        particles, scored = self.score_particles(
            density, params, self._model_params(state), key_particles, key_batch, args, kwargs,
            indices=indices,
        )  # fmt: skip
        return density, params, particles, scored

    def on_batch(
        self,
        density: GuideDensity,
        indices: dict[str, jax.Array] | None,
        key_batch: jax.Array,
        args: tuple,
        kwargs: dict,
    ) -> tuple[GuideDensity, dict[str, jax.Array] | None]:
        """The density of the update's mini-batch and that batch's indices: for a
        user-written guide with local latents (``density.at_indices``), the density on
        the global batch ``indices`` or, when ``None``, on the plates' draw from
        ``key_batch`` (the one :meth:`score_particles` would make); else both as given."""
        if density.at_indices is None:
            return density, indices
        if indices is None:
            indices = draw_plate_indices(subsampled_plates(self.model, args, kwargs), key_batch)
        return density.at_indices(indices), indices

    def _model_params(self, state: EngineState) -> dict:
        """The model's unconstrained ``numpyro.param`` values (none for the closed-form engines)."""
        return {}

    def run(
        self,
        rng_key: jax.Array,
        num_steps: int,
        *args: Any,
        progress_bar: bool = True,
        init_state: EngineState | None = None,
        init_params: dict | None = None,
        checkpoint_every: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        stable_update: bool = False,
        forward_mode_differentiation: bool = False,
        **kwargs: Any,
    ) -> SVIRunResult:
        """Run ``num_steps`` updates, like ``SVI.run``.

        With ``progress_bar=True`` a jitted update runs in a Python loop under tqdm
        (losses fetched from the device in chunks); otherwise the loop is one
        ``lax.scan`` (one per ``checkpoint_every`` updates).

        Parameters
        ----------
        rng_key : jax.Array
            Random key for :meth:`init` (unused with ``init_state``).
        num_steps : int
            Updates to run.
        *args, **kwargs
            The model's and guide's arguments.
        progress_bar : bool
            Show a tqdm bar.
        init_state : EngineState, optional
            Continue from this state (e.g. :meth:`load`'s, or an exception's
            ``last_state``).
        init_params : dict, optional
            Constrained initial values for some guide params, as in ``SVI.run``.
        checkpoint_every, checkpoint_path
            Write a checkpoint (:meth:`save`) to ``checkpoint_path`` after every
            ``checkpoint_every`` updates and at the end (both or neither).
        stable_update : bool
            As in ``SVI.run``; every update here is stable either way (one whose loss,
            scores or params are not finite is rejected and counted).
        forward_mode_differentiation : bool
            As in ``SVI.run``; only ``False``: the scores are reverse-mode gradients.

        Returns
        -------
        numpyro.infer.svi.SVIRunResult
            ``params`` (constrained), the final ``state`` (an :class:`EngineState`, with
            ``num_score_calls``) and the per-step ``losses``.

        Raises
        ------
        RuntimeError
            When more than ``psvi.checks.MAX_REJECTION_RATE`` (half) of the updates were
            rejected, or ``max_consecutive_rejections`` in a row. Any exception raised
            during the updates (``KeyboardInterrupt`` included) carries the state of the
            last completed update (or chunk of them) as ``error.last_state``: continue
            with ``run(None, steps_left, *args, init_state=error.last_state)``.

        Warns
        -----
        RuntimeWarning
            When some updates were rejected, or when the run's ``-ELBO`` estimates rose
            (:func:`psvi.checks.rising_loss_message`).
        """
        if num_steps < 1:
            raise ValueError("num_steps must be a positive integer.")
        check_checkpointing(checkpoint_every, checkpoint_path)
        del stable_update  # every update is stable
        self._refuse_forward_mode(forward_mode_differentiation)
        if init_state is None:
            state = self.init(rng_key, *args, init_params=init_params, **kwargs)
        else:
            state = init_state
        rejected_before = int(state.num_rejected)
        completed = [state]  # the last completed state, for an exception

        def body_fn(state, _):
            return self.update(state, *args, **kwargs)

        def checkpoint_at(state: EngineState) -> None:
            completed[0] = state
            if checkpoint_path is not None:
                self.save(checkpoint_path, state)

        try:
            if progress_bar:
                run_loop = self._run_with_progress_bar
                state, losses = run_loop(
                    jax.jit(body_fn), completed, num_steps, checkpoint_every, checkpoint_at
                )
            else:
                state, losses = self._run_scan(body_fn, state, num_steps, checkpoint_every, checkpoint_at)
        except BaseException as error:
            error.last_state = completed[0]
            error.add_note(
                f"{type(self).__name__}.run stopped: the state of its last completed update is "
                "error.last_state; continue with run(None, steps_left, ..., "
                "init_state=error.last_state), or save it with engine.save(path, error.last_state)."
            )
            raise
        self._check_rejection_streak(state)
        rejected = int(state.num_rejected) - rejected_before
        check_rejection_rate(type(self).__name__, rejected, num_steps)
        if rejected:
            message = rejection_message(type(self).__name__, rejected)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        if (message := rising_loss_message(type(self).__name__, np.asarray(losses).tolist())) is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return SVIRunResult(self.get_params(state), state, losses)

    def _run_scan(
        self,
        body_fn: Callable,
        state: EngineState,
        num_steps: int,
        every: int | None,
        checkpoint_at: Callable,
    ) -> tuple[EngineState, jax.Array]:
        """``num_steps`` updates as ``lax.scan`` chunks of ``every`` (all at once when
        ``None``), ``checkpoint_at(state)`` after each chunk."""
        scan = jax.jit(lambda s, n: lax.scan(body_fn, s, None, length=n), static_argnums=1)
        chunk, losses = every or num_steps, []
        for start in range(0, num_steps, chunk):
            state, chunk_losses = scan(state, min(chunk, num_steps - start))
            losses.append(chunk_losses)
            checkpoint_at(state)
        return state, jnp.concatenate(losses)

    def _run_with_progress_bar(
        self,
        jitted_body: Callable,
        completed: list,
        num_steps: int,
        every: int | None,
        checkpoint_at: Callable,
    ) -> tuple[EngineState, jax.Array]:
        """``num_steps`` jitted updates under tqdm from ``completed[0]``, which follows the
        last completed update; ``checkpoint_at(state)`` every ``every`` updates."""
        state, losses = completed[0], []
        chunk = max(num_steps // 20, 1)
        with tqdm.trange(1, num_steps + 1) as bar:
            for i in bar:
                state, loss = jitted_body(state, None)
                completed[0] = state
                losses.append(loss)
                if every is not None and (i % every == 0 or i == num_steps):
                    checkpoint_at(state)
                if i % chunk == 0:
                    self._check_rejection_streak(state)
                    losses[i - chunk :] = jax.device_get(losses[i - chunk :])
                    recent = [x for x in losses[i - chunk :] if x == x]
                    avg = sum(recent) / len(recent) if recent else float("nan")
                    bar.set_postfix_str(
                        f"init loss: {float(losses[0]):.4f}, avg. loss [{i - chunk + 1}-{i}]: {avg:.4f}",
                        refresh=False,
                    )
        return state, jnp.stack(losses)

    def _check_rejection_streak(self, state: EngineState) -> None:
        check_rejection_streak(
            type(self).__name__, int(state.consecutive_rejected), self.max_consecutive_rejections,
            "updates",
        )  # fmt: skip

    # ------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike, state: EngineState) -> None:
        """Write ``state`` atomically (:mod:`psvi.checkpoint`: plain arrays and a JSON
        header, no pickle). Everything a resumed run needs is in the state (params,
        optimizer state, key, counters, running averages), so ``engine.run(None, n, *args,
        init_state=engine.load(path, *args))`` continues exactly where the run stopped.
        With data parallelism across processes only process 0 writes (the state is
        replicated); :meth:`load` it on any number of devices."""
        if self.constrain_fn is None:
            raise RuntimeError(f"Call {type(self).__name__}.init(rng_key, *args) (or run) first.")
        if jax.process_index() != 0:
            return
        arrays, leaves = {}, []
        for i, (key_path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(state)[0]):
            array, tag = _plain_leaf(leaf)
            if isinstance(array, jax.Array) and not array.is_fully_addressable:
                array = array.addressable_data(0)  # replicated over the processes
            arrays[f"a{i}"] = np.asarray(array)
            leaves.append([jax.tree_util.keystr(key_path), f"a{i}", tag])
        checkpoint.write(path, {**self._checkpoint_header(state), "leaves": leaves}, arrays)

    def _class_names(self) -> dict[str, str | None]:
        """The engine's, guide's and optimizer's class names (a checkpoint's first check)."""
        return {
            "engine": type(self).__name__,
            "guide": type(self.guide).__name__,
            "optimizer": None if self.optim is None else type(self.optim).__name__,
        }

    def _check_resumed(self, saved_header: dict) -> None:
        """Warnings about a checkpoint that fits the engine but resumes differently
        (its ``saved_header``; after :meth:`init`)."""

    def _checkpoint_header(self, state: EngineState) -> dict:
        """What a checkpoint must agree on with the engine it is loaded into."""
        names = self._class_names()
        return checkpoint.header(
            "numpyro", names["engine"], guide=names["guide"], optimizer=names["optimizer"],
            latent_sites={name: list(shape) for name, shape in self._latent_shapes.items()},
            state=_leaf_specs(state),
        )  # fmt: skip

    def load(
        self, path: str | os.PathLike, *args: Any, allow_pickle: bool = False, **kwargs: Any
    ) -> EngineState:
        """The state saved at ``path`` by :meth:`save`, checked against this engine.

        Refuses a damaged file and a checkpoint of another backend, engine, guide or
        optimizer class before the model runs; then sets the engine up with
        ``args``/``kwargs`` (:meth:`init`) and refuses one of another model or settings.
        Each error names both sides. Nothing in the file can run code.

        Parameters
        ----------
        path : str or os.PathLike
            A file written by :meth:`save`.
        *args, **kwargs
            The model's and guide's arguments, as for :meth:`init`.
        allow_pickle : bool
            Read a state of psvi before format 1 (written by ``save_state``, unpickled:
            only for a file you trust; :meth:`save` then writes it in the safe format).

        Raises
        ------
        psvi.checkpoint.CheckpointError
            The file is truncated, corrupted, an old pickle checkpoint, or not a checkpoint.
        psvi.checkpoint.CheckpointMismatch
            It was written by another engine, guide, optimizer or model.
        """
        if allow_pickle:
            return _read_legacy_state(path, self.init(random.PRNGKey(0), *args, **kwargs))
        try:
            saved, arrays = checkpoint.read(path)
        except checkpoint.LegacyCheckpointError as error:
            recipe = "state = engine.load(path, *args, allow_pickle=True), then engine.save(path, state)."
            raise checkpoint.LegacyCheckpointError(path, checkpoint.legacy_message(error, recipe)) from None
        saved = _renamed_state_fields(saved)
        checkpoint.check_match(path, "backend", saved["backend"], "numpyro", "Load it with pyro_psvi.")
        fix = "Build the engine, guide and optimizer as for the saved run, from the same model."
        for field, name in self._class_names().items():
            checkpoint.check_match(path, f"{field} classes", saved[field], name, fix)
        template = self.init(random.PRNGKey(0), *args, **kwargs)
        current = self._checkpoint_header(template)
        self._check_resumed(saved)
        checkpoint.check_match(path, "latent sites", saved["latent_sites"], current["latent_sites"], fix)
        current_specs = current["state"]

        def averages_iterates(specs: dict) -> bool:
            return any(key.startswith(".averages.params[") for key in specs)

        averaged = (averages_iterates(saved["state"]), averages_iterates(current_specs))
        checkpoint.check_match(
            path, "iterate averaging settings", *averaged,
            "Build the engine with the saved run's average_iterates.",
        )  # fmt: skip
        for fresh in (".epoch_order", ".averages.trust", ".averages.window", ".averages.coarse"):
            if not any(key.startswith(fresh) for key in saved["state"]):
                # Saved without reshuffling, or before it, the trust region's growth, the
                # averages' restarts or the coarse correction existed: a fresh epoch
                # starts, the budget at its default, the average restarting at the next
                # update, the coarse curvature averaged afresh.
                current_specs = {k: v for k, v in current_specs.items() if not k.startswith(fresh)}
        checkpoint.check_match(path, "state leaves (shape, dtype)", saved["state"], current_specs, fix)
        saved_leaves = {}
        for key, name, tag in saved["leaves"]:
            array = arrays[name]
            saved_leaves[key] = (
                random.wrap_key_data(jnp.asarray(array), impl=tag[4:])
                if tag.startswith("key:")
                else jnp.asarray(array)
            )
        template_leaves = jax.tree_util.tree_flatten_with_path(template)[0]
        leaves = [saved_leaves.get(jax.tree_util.keystr(key), leaf) for key, leaf in template_leaves]
        return jax.tree.unflatten(jax.tree.structure(template), leaves)


RENAMED_STATE_FIELDS = {".averages.trust.scale_tril": ".averages.trust.guide_scale"}
"""Old state leaf paths and their names now (the growth's guide scale, named for a full
covariance until the diagonal guides' closed-form step shared it)."""


def _sample_shapes(guide_trace: dict) -> dict[str, tuple[int, ...]]:
    """``{site name: shape}`` of a guide trace's latent sample sites."""
    return {
        name: tuple(jnp.shape(site["value"]))
        for name, site in guide_trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def _renamed_state_fields(saved: dict) -> dict:
    """A checkpoint header with the leaf paths of :data:`RENAMED_STATE_FIELDS` renamed."""

    def renamed(key: str) -> str:
        return RENAMED_STATE_FIELDS.get(key, key)

    return {
        **saved,
        "state": {renamed(key): spec for key, spec in saved["state"].items()},
        "leaves": [(renamed(key), *rest) for key, *rest in saved["leaves"]],
    }


def _split_static(tree: Any) -> tuple[list, tuple]:
    """The array leaves of ``tree`` and what rebuilds it (its structure and other leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [leaf for leaf in leaves if isinstance(leaf, jax.Array)]
    others = [None if isinstance(leaf, jax.Array) else leaf for leaf in leaves]
    return arrays, (treedef, others)


def _merge_static(arrays: list, rest: tuple) -> Any:
    treedef, others = rest
    supply = iter(arrays)
    return jax.tree.unflatten(treedef, [next(supply) if leaf is None else leaf for leaf in others])


def _plain_leaf(leaf: Any) -> tuple[Any, str]:
    """A state leaf as an array and its tag: a typed PRNG key as its key data, tagged
    ``"key:<impl>"``; anything else as it is, tagged ``"array"``."""
    if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
        return random.key_data(leaf), f"key:{random.key_impl(leaf)}"
    return leaf, "array"


def _leaf_specs(state: Any) -> dict[str, list]:
    """``{leaf path: [shape, dtype]}`` of a state (a typed key: its data's)."""
    specs = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array, _ = _plain_leaf(leaf)
        specs[jax.tree_util.keystr(key_path)] = [list(jnp.shape(array)), str(jnp.result_type(array))]
    return specs


def _read_legacy_state(path: str | os.PathLike, template: EngineState) -> EngineState:
    """A state pickled by psvi before format 1 (the caller trusts the file); a state from
    before the running averages or the epochs gets the template's fresh ones."""
    with open(path, "rb") as f:
        state = pickle.load(f)

    def to_device(leaf):
        if isinstance(leaf, _TypedKey):
            return random.wrap_key_data(jnp.asarray(leaf.data), impl=leaf.impl)
        return jnp.asarray(leaf)

    state = jax.tree.map(to_device, state, is_leaf=lambda x: isinstance(x, _TypedKey))
    if state.averages is None:
        state = state._replace(averages=template.averages)
    if state.epoch_order is None:  # saved before reshuffling: a fresh epoch starts
        state = state._replace(epoch_order=template.epoch_order)
    for fresh in ("trust", "window", "coarse"):  # saved before these existed: fresh ones
        started = getattr(template.averages, fresh, None)
        if started is not None and getattr(state.averages, fresh) is None:
            state = state._replace(averages=state.averages._replace(**{fresh: started}))
    checkpoint.check_match(
        path, "state leaves (shape, dtype)", _leaf_specs(state), _leaf_specs(template),
        "Build the engine, guide and optimizer as for the saved run, from the same model.",
    )  # fmt: skip
    return state


class _TypedKey(NamedTuple):
    """How psvi before format 1 pickled a new-style JAX key (read by the legacy reader)."""

    data: np.ndarray
    impl: str
