"""What every Pyro engine fitting a guide from model scores shares.

:class:`ScoreEngine` holds the set-up on the first step (model checks, the guide's
family and density, the particle-vectorization probe), the guide's params read from
and written to Pyro's param store, the score phase
(:meth:`ScoreEngine.score_particles`), the counters, :meth:`ScoreEngine.step`,
:meth:`ScoreEngine.run`, :meth:`ScoreEngine.evaluate_loss` and checkpoints.
Subclasses write :meth:`ScoreEngine.update`: :class:`~pyro_psvi.ProximalScoreVI`,
:class:`~pyro_psvi.GSM` and :class:`~pyro_psvi.BaM`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyro
import torch
import tqdm
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints, transform_to
from torch.distributions.constraints import Constraint

from psvi import checkpoint
from psvi.checks import (
    EnumerationError,
    caller_stacklevel,
    check_checkpointing,
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
from pyro_psvi._compat import forget_optimizers, load_optimizer_states, optimizer_states
from pyro_psvi.batches import EpochOrder
from pyro_psvi.enumeration import enumerated_model, enumerated_sites
from pyro_psvi.guides import GuideDensity, Params, antithetic, guide_family, orthogonal
from pyro_psvi.objective import fisher_statistics, negative_elbo, weighted_fisher
from pyro_psvi.parallel import ScoreReducer, ShardedPlates
from pyro_psvi.scores import (
    ModelScores,
    at_random_values,
    autoguide_latent_shapes,
    batch_ratio,
    check_model,
    guess_max_plate_nesting,
    latent_shapes,
    local_latents,
    log_joints,
    masked_latents,
    model_scores,
    same_log_joints,
    unmodelled_scores,
)


class ScoreEngine:
    """Set-up, scores, counters, ``step`` / ``run`` and checkpoints of the Pyro engines.

    Parameters
    ----------
    model, guide
        A Pyro model and a guide of a registered family
        (:func:`pyro_psvi.guides.guide_family`).
    num_particles : int
        Particles ``S`` per step, hence model score calls per step.
    vectorize_particles : bool
        One model pass for all particles (probed on the first step), or one each.
    max_plate_nesting : int, optional
        The model's plate nesting; guessed from a model trace when omitted.
    score_method : {"closed_form", "autodiff"}
        How the guide's score is computed for Gaussian guides.
    num_kl_draws : int
        Draws for the Monte Carlo KL of guides without a closed form, and base draws
        for a flow guide's displacement.
    max_consecutive_rejections : int or None
        :meth:`step` raises once this many steps in a row were rejected (``None``:
        never); :meth:`run` checks at its end.
    data_parallel : bool, ScoreReducer or None
        Split each mini-batch over the ranks of a ``torch.distributed`` process group
        (:mod:`pyro_psvi.parallel`, docs/data_parallel.md). ``None``: on when a process
        group with more than one rank is initialized at the first step; a
        :class:`~pyro_psvi.parallel.ScoreReducer` sets the group and the timeout.
    reshuffle : bool
        Draw the mini-batches of the model's subsampled plates by random reshuffling
        (:mod:`pyro_psvi.batches`: every member once per epoch, as
        ``DataLoader(shuffle=True, drop_last=True)``) rather than independently, as the
        plate alone does. No effect on models without a subsampled plate.
    """

    def __init__(
        self,
        model: Callable,
        guide: Any,
        *,
        num_particles: int,
        vectorize_particles: bool = True,
        max_plate_nesting: int | None = None,
        score_method: str = "closed_form",
        num_kl_draws: int = 256,
        max_consecutive_rejections: int | None = 20,
        data_parallel: bool | ScoreReducer | None = None,
        reshuffle: bool = True,
    ) -> None:
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}.")
        self.family = guide_family(guide)
        self.family.check_supported()
        self.model = model
        self.guide = guide
        self.num_particles = int(num_particles)
        self.antithetic_particles = False  # a Gaussian guide's particles in reflected pairs
        self.particle_design: OrthogonalDesign | None = None  # or from an orthogonal design
        self._designed: tuple[GuideDensity, GuideDensity] | None = None  # (density, its design's)
        self._subsampled_plates: frozenset[str] = frozenset()  # those local latents sit in
        self.vectorize_particles = bool(vectorize_particles)
        self.max_plate_nesting = max_plate_nesting
        self.density_options = DensityOptions(score_method, int(num_kl_draws))
        self.max_consecutive_rejections = max_consecutive_rejections
        self.num_score_calls = 0
        self.batch_ratio = 1.0  # the model's largest plate size over subsample size
        self.density: GuideDensity | None = None
        self._module_leaves: dict[str, torch.Tensor] | None = None  # module_local_params
        self._transforms: dict[str, Any] = {}
        self._num_rejected: torch.Tensor | int = 0
        self._consecutive_rejected: torch.Tensor | int = 0
        self._latent_shapes: dict[str, tuple[int, ...]] = {}
        self._model_param_names: tuple[str, ...] = ()
        self._arg_signature: Any = None
        self._build_density: Callable[[tuple, dict], GuideDensity] | None = None
        self._pending_checkpoint: tuple | None = None  # loaded before the first step
        self.data_parallel = data_parallel
        self.reducer: ScoreReducer | None = None  # set up on the first step
        self._shards: ShardedPlates | None = None  # draws the batches (rank's share, epochs)
        self._masked_sites: tuple[str, ...] = ()  # latent sites whose density the model masks
        self._scored_model = model  # the model the scores come from (enumerated, set up)
        self.epoch_order = EpochOrder() if reshuffle else None

    @property
    def num_rejected(self) -> int:
        """Steps rejected so far (reading it synchronises with the device)."""
        return int(self._num_rejected)

    # ----------------------------------------------------------------- set-up
    def _setup(self, args: tuple, kwargs: dict) -> None:
        _check_devices(None, args, kwargs)
        self.reducer = _reducer(self.data_parallel)
        if self.reducer is not None:
            self._shards = ShardedPlates(self.reducer.rank, self.reducer.world_size, self.epoch_order)
        elif self.epoch_order is not None:
            self._shards = ShardedPlates(order=self.epoch_order)
        model_trace = check_model(self.model, args, kwargs)
        self._latent_shapes = latent_shapes(model_trace)
        self.batch_ratio = batch_ratio(model_trace)
        local = local_latents(model_trace)
        self._masked_sites = masked_latents(model_trace)
        if self.reducer is not None:
            self._check_data_parallel(model_trace, local)
            # The global batch is R ranks' batches: the global N/B is the rank's over R.
            self.batch_ratio = self.batch_ratio / self.reducer.world_size
        self._check_local_latents(local)
        self._subsampled_plates = frozenset(local.values())
        self._arg_signature = _signature(args, kwargs)
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(model_trace)
        if enumerated_sites(model_trace):  # summed out of the scores' log joint
            self._scored_model = enumerated_model(self.model, self.max_plate_nesting)
        options = self.density_options._replace(max_plate_nesting=self.max_plate_nesting)
        existing = set(pyro.get_param_store().keys())
        fresh_guide = getattr(self.guide, "prototype_trace", False) is None  # an autoguide never run
        # Set-up draws no random numbers from the run's stream (a resumed run matches).
        with poutine.block(), torch.random.fork_rng(devices=_cuda_devices(args, kwargs)):
            # Running the guide once sets it up and creates its params.
            guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
            prototype = getattr(self.guide, "prototype_trace", None)  # an autoguide's
            if prototype is not None:
                check_latents_match(
                    autoguide_latent_shapes(prototype, guide_trace), self._latent_shapes,
                    "The guide was built for another model: its latent sites differ from "
                    "this model's",
                    "Build the guide from the model you fit, e.g. AutoNormal(model).",
                )  # fmt: skip
            self._build_density = self.family.setup(
                self.guide, model_trace, guide_trace, args, kwargs, options
            )
            density = self._build_density(args, kwargs)
        if pyro.settings.get("module_local_params"):
            # The params live in their modules; the traces' param sites hold them.
            sources = {**_param_sources(model_trace), **_param_sources(guide_trace)}
            self._module_leaves = {name: leaf for name, (leaf, _) in sources.items()}
            constraints = {name: constraint for name, (_, constraint) in sources.items()}
        else:
            self._module_leaves = None
            constraints = pyro.get_param_store().get_state()["constraints"]
        missing = [name for name in density.param_names if name not in constraints]
        if missing:
            raise RuntimeError(
                f"The guide's params {missing} are not in Pyro's param store; was the "
                "param store cleared after the guide was built? Build a fresh guide."
            )
        shared = sorted(existing.intersection(density.param_names))
        if fresh_guide and shared and self._pending_checkpoint is None and self._module_leaves is None:
            warnings.warn(
                f"The params {shared} of this new {type(self.guide).__name__} were already in "
                "Pyro's param store (another guide with the same site names made them), so it "
                "starts from their values and shares them: a step of either fit moves both, "
                "and save/load of one holds the other's. Fit each model in its own "
                "`with pyro.get_param_store().scope():` block, or call pyro.clear_param_store() "
                "before building the guide.",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
        self._model_param_names = tuple(
            name for name, site in model_trace.nodes.items() if site["type"] == "param"
        )
        self._transforms = {
            name: transform_to(constraints[name]) for name in (*density.param_names, *self._model_param_names)
        }
        self.density = density
        _check_devices(self._leaves(), args, kwargs)
        if self.reducer is not None:
            self.reducer.check_same(
                [*self._leaves(model_params=True).values(), torch.get_rng_state().double()],
                "the same initial params and random state",
                "Call pyro.set_rng_seed(seed) with the same seed on every rank before "
                "building the guide.",
            )  # fmt: skip
        if self.vectorize_particles:
            with torch.random.fork_rng(devices=_cuda_devices(args, kwargs)):
                self.vectorize_particles = self._can_vectorize(args, kwargs)

    def _check_data_parallel(self, model_trace: poutine.Trace, local: dict[str, str]) -> None:
        """Data parallelism needs a mini-batch to split and no local latents."""
        if local:
            raise NotImplementedError(data_parallel_local_message(*next(iter(local.items())), "rank"))
        batches = [
            name for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and site_is_subsample(site)
            and (site["fn"].subsample_size is not None or len(site["value"]) < site["fn"].size)
        ]  # fmt: skip
        if not batches:
            raise ValueError(no_mini_batch_message("pyro", "rank"))

    def _check_local_latents(self, local: dict[str, str]) -> None:
        """Local latents in a subsampled plate (``{site: plate}``) need a guide whose params
        span the plate's full size (AutoNormal)."""
        if local and not self.family.local_latents:
            name, plate = next(iter(local.items()))
            raise NotImplementedError(local_latent_message(name, plate, self.family.name))

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        """Set up on the first call; later, re-check the model when the argument shapes
        change (and build a user-written guide's density with this call's arguments)."""
        if self.density is None:
            self._setup(args, kwargs)
            if self._pending_checkpoint is not None:
                self._restore_checkpoint()
        self.density = self._build_density(args, kwargs)  # a fresh batch's, for a user guide
        signature = _signature(args, kwargs)
        if signature != self._arg_signature:
            with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=[]):
                model_trace = poutine.trace(at_random_values(self.model)).get_trace(*args, **kwargs)
            check_latents_match(
                self._latent_shapes, latent_shapes(model_trace),
                "With these arguments the model's latent sites differ from those of the "
                "first step",
                "Build a new guide and engine for the new arguments: the guide's shapes are "
                "fixed at its first step.",
            )  # fmt: skip
            self._arg_signature = signature

    def _can_vectorize(self, args: tuple, kwargs: dict) -> bool:
        """Probe the vectorized pass once against one-particle-at-a-time passes."""
        if self.num_particles == 1:
            return False
        with torch.no_grad():
            particles = self.density.sample(self._constrain(self._leaves()), self.num_particles)
            subsample: dict[str, torch.Tensor] = {}
            common = dict(subsample=subsample, max_plate_nesting=self.max_plate_nesting)
            try:
                vectorized = log_joints(
                    self._scored_model, self.density, particles, args, kwargs,
                    vectorize=True, check_shapes=True, **common,
                )  # fmt: skip
            except EnumerationError:  # the model as written, not its vectorization
                raise
            # Model code may fail in any way under the extra particle dimension; the
            # sequential pass below then runs the model as written.
            except Exception as error:  # noqa: BLE001
                reason = f"{type(error).__name__}: {error}"
            else:
                one_at_a_time = log_joints(
                    self._scored_model, self.density, particles, args, kwargs, vectorize=False, **common
                )
                if same_log_joints(vectorized, one_at_a_time):
                    return True
                reason = (
                    f"its vectorized log joints {vectorized.tolist()} differ from those of "
                    f"one particle at a time {one_at_a_time.tolist()}"
                )
        warnings.warn(
            f"ProximalScoreVI cannot evaluate this model's particles in one vectorized pass "
            f"({reason}). It evaluates them one model call at a time instead. To vectorize, "
            "write the model broadcast-safe, as for Trace_ELBO(vectorize_particles=True): "
            "latents get leading particle dims, e.g. `(x * w).sum(-1)` rather than "
            "`x @ w`; to silence this, pass vectorize_particles=False.",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
        return False

    def _leaves(self, model_params: bool = False) -> dict[str, torch.Tensor]:
        """The guide's unconstrained param tensors (and the model's, if asked): fetched from
        the param store, or with ``module_local_params`` those of the modules."""
        names = (*self.density.param_names, *(self._model_param_names if model_params else ()))
        if self._module_leaves is not None:
            return {name: self._module_leaves[name] for name in names}
        # The unconstrained tensors themselves: get_param would constrain each first.
        unconstrained = dict(pyro.get_param_store().named_parameters())
        return {name: unconstrained[name] for name in names}

    def _constrain(self, unconstrained: dict[str, torch.Tensor]) -> Params:
        return {name: self._transforms[name](value) for name, value in unconstrained.items()}

    # ----------------------------------------------------------------- phases
    def _drawing_density(self) -> GuideDensity:
        """The density the particles are drawn from: the guide's, in the orthogonal design
        or antithetic pairs where set up (the design's tensors kept while the density is)."""
        if self.particle_design is None:
            return antithetic(self.density) if self.antithetic_particles else self.density
        if self._designed is None or self._designed[0] is not self.density:
            self._designed = (self.density, orthogonal(self.density, self.particle_design))
        return self._designed[1]

    def score_particles(
        self, params: Params, args: tuple, kwargs: dict, model_params=(), *, statistics: bool = False
    ) -> tuple[torch.Tensor, ModelScores]:
        """``S`` particles from the guide at constrained ``params`` and their
        :class:`~pyro_psvi.scores.ModelScores` on one fresh mini-batch shared by the
        particles (with the mean gradient in each tensor of ``model_params``).
        ``statistics``: see :meth:`reduce_scores`."""
        try:
            with self._sharded():
                with torch.no_grad():  # a user guide's plates draw the step's batch
                    particles = self._drawing_density().sample(params, self.num_particles)
                scored = model_scores(
                    self._scored_model, self.density, particles, args, kwargs,
                    max_plate_nesting=self.max_plate_nesting, vectorize=self.vectorize_particles,
                    model_params=model_params,
                )  # fmt: skip
        except Exception:
            if self.reducer is not None:  # the other ranks raise too, instead of waiting
                self.reducer.mean(self._reduced_like(particles, model_params, statistics), failed=True)
            raise
        scored = self.reduce_scores(params, particles, scored, statistics)
        return particles, self._where_unmodelled(params, particles, scored)

    def _where_unmodelled(self, params: Params, particles: torch.Tensor, scored: ModelScores) -> ModelScores:
        """``scored`` with ``q_t``'s own scores where a masked site's entry has no density
        in the model (:func:`~pyro_psvi.scores.unmodelled_scores`); a diagonal guide's
        reduced statistics (data parallel) are left as they are."""
        if not self._masked_sites or scored.scores is None:
            return scored
        masked = torch.cat([
            torch.full((math.prod(site.shape),), site.name in self._masked_sites, device=particles.device)
            for site in self.density.sites
        ])  # fmt: skip
        with torch.no_grad():
            guide_scores = self.density.score(params, particles)
        return scored._replace(scores=unmodelled_scores(scored.scores, guide_scores, masked))

    def reduce_scores(
        self, params: Params, particles: torch.Tensor, scored: ModelScores, statistics: bool = False
    ) -> ModelScores:
        """With data parallelism, the mean over the ranks of the scores of their shares
        of the mini-batch, in one all-reduce of the log joints, scores and param
        gradients; on one process, ``scored`` as it is.

        With ``statistics`` and a diagonal Gaussian guide, the two score-dependent
        :class:`~pyro_psvi.objective.FisherStatistics` are reduced in place of the
        ``(S, D)`` scores (``2 D`` floats; the particles, hence the other sums, are the
        same on every rank) and returned in ``statistics``, the scores as ``None``.
        """
        if self.reducer is None:
            return scored
        if not self._reduces_statistics(statistics):
            log_joints, scores, *param_grads = self.reducer.mean(
                [scored.log_joints, scored.scores, *scored.param_grads]
            )
            return scored._replace(log_joints=log_joints, scores=scores, param_grads=param_grads)
        stats = fisher_statistics(self.density, params, particles, scored.scores)
        log_joints, cross, score, *param_grads = self.reducer.mean(
            [scored.log_joints, stats.cross, stats.score, *scored.param_grads]
        )
        # sum_s g_s^2 is not a mean over ranks; it enters only the reported Fisher value,
        # which then drops the (constant) spread of the scores around their mean.
        stats = stats._replace(cross=cross, score=score, score_sq=score**2 / stats.count)
        return scored._replace(log_joints=log_joints, scores=None, param_grads=param_grads, statistics=stats)

    def _reduces_statistics(self, statistics: bool) -> bool:
        return statistics and self.density.loc_scale is not None

    def _sharded(self) -> contextlib.AbstractContextManager:
        """Where the model's plates draw their batches: this rank's share, from the
        epochs when reshuffling."""
        return contextlib.nullcontext() if self._shards is None else self._shards

    def _reduced_like(self, particles: torch.Tensor, model_params, statistics: bool) -> list[torch.Tensor]:
        """Zeros shaped as what :meth:`reduce_scores` all-reduces."""
        sums = (2, particles.shape[-1])  # cross and score
        coordinates = (
            particles.new_zeros(sums) if self._reduces_statistics(statistics) else torch.zeros_like(particles)
        )
        return [particles.new_zeros(len(particles)), coordinates, *map(torch.zeros_like, model_params)]

    # ------------------------------------------------------------------ steps
    def update(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One step; returns its loss as a 0-dim tensor without a host sync."""
        raise NotImplementedError

    def step(self, *args: Any, **kwargs: Any) -> float:
        """One step (:meth:`update`), its loss read as a float; NaN when rejected."""
        loss = float(self.update(*args, **kwargs))
        if loss != loss:
            message = rejection_message(type(self).__name__, 1)
            warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())
            self._check_rejection_streak()
        return loss

    def record(self, accept: torch.Tensor) -> None:
        """Count one step, accepted or rejected (on the device: no sync)."""
        rejected = (~accept).to(torch.int64)
        self._num_rejected = self._num_rejected + rejected
        self._consecutive_rejected = (self._consecutive_rejected + rejected) * rejected
        self.num_score_calls += self.num_particles

    @contextlib.contextmanager
    def _restored_on_interrupt(
        self, leaves: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], restore: Callable[[], None]
    ) -> Iterator[None]:
        """On any exception (``KeyboardInterrupt`` included) inside the block, put back the
        state of the last completed step: the param-store tensors ``leaves`` to ``stored``,
        the counters, and what ``restore()`` restores; then re-raise."""
        counters = self._counters()
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for name, leaf in leaves.items():
                    leaf.copy_(stored[name])
                    leaf.grad = None
                restore()
            self._set_counters(counters)
            raise

    def _counters(self) -> tuple:
        return self.num_score_calls, self._num_rejected, self._consecutive_rejected

    def _set_counters(self, counters: tuple) -> None:
        self.num_score_calls, self._num_rejected, self._consecutive_rejected = counters

    def _check_rejection_streak(self) -> None:
        check_rejection_streak(
            type(self).__name__, int(self._consecutive_rejected), self.max_consecutive_rejections,
            "steps",
        )  # fmt: skip

    # ------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write everything a resumed run needs, atomically (:mod:`psvi.checkpoint`: plain
        arrays and a JSON header, no pickle): this engine's params from the param store,
        the optimizer's state, the RNG states (torch, CUDA when in use, Python, NumPy), the
        counters and the engine's running averages. With data parallelism only rank 0
        writes (the ranks hold the same state); :meth:`load` it on any number of ranks."""
        if self.density is None:
            raise RuntimeError("Nothing to save before the first step.")
        if self.reducer is not None and self.reducer.rank != 0:
            return  # every rank holds the same state: rank 0 writes it
        leaves = self._leaves(model_params=True)
        optim = getattr(self, "optim", None)
        optim_state = None if optim is None else optimizer_states(optim, leaves)
        state = {
            "params": {name: leaf.detach() for name, leaf in leaves.items()},
            "optim": optim_state,
            "rng": pyro.util.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "counters": {
                "num_score_calls": self.num_score_calls,
                "num_rejected": self.num_rejected,
                "consecutive_rejected": int(self._consecutive_rejected),
            },
            "extra": self._checkpoint_extra(),
            "epoch_order": None if self.epoch_order is None else self.epoch_order.state_dict(),
        }
        description, arrays = checkpoint.flatten(state, _to_array)
        checkpoint.write(path, {**self._checkpoint_header(), "state": description}, arrays)

    def _checkpoint_header(self) -> dict:
        """What a checkpoint must agree on with the engine it is loaded into."""
        leaves = self._leaves(model_params=True)
        return checkpoint.header(
            "pyro", type(self).__name__, guide=type(self.guide).__name__,
            optimizer=_optimizer_name(getattr(self, "optim", None)),
            latent_sites={name: list(shape) for name, shape in self._latent_shapes.items()},
            params={name: [list(leaf.shape), str(leaf.dtype)] for name, leaf in leaves.items()},
        )  # fmt: skip

    def load(
        self,
        path: str | os.PathLike,
        map_location: str | torch.device | None = None,
        *,
        allow_pickle: bool = False,
    ) -> None:
        """Restore a checkpoint written by :meth:`save`; the next step continues the saved
        run exactly (build the engine with the same model, guide class and optimizer).

        Before the first step, the checkpoint is checked against the engine's class, guide
        class and optimizer now, and against its latent sites and params at the first step
        (which sets the engine up and then restores it); after it, all at once. Nothing
        in the file can run code.

        Parameters
        ----------
        path : str or os.PathLike
            A file written by :meth:`save`.
        map_location : str or torch.device, optional
            The device to continue on: the restored params go there. By default they go
            to the device of the engine's own params, which follow the model's data, so a
            checkpoint written on a GPU loads on a CPU-only machine as it is.
        allow_pickle : bool
            Read a checkpoint of psvi before format 1 (``torch.save``, unpickled: only
            for a file you trust; :meth:`save` then writes it in the safe format).

        Raises
        ------
        psvi.checkpoint.CheckpointError
            The file is truncated, corrupted, an old pickle checkpoint, or not a checkpoint.
        psvi.checkpoint.CheckpointMismatch
            It was written by another engine, guide, optimizer or model (the message
            names both sides).
        """
        if allow_pickle:
            saved_header, state = self._read_legacy(path)
        else:
            try:
                saved_header, arrays = checkpoint.read(path)
            except checkpoint.LegacyCheckpointError as error:
                recipe = "engine.load(path, allow_pickle=True), then engine.save(path)."
                raise checkpoint.LegacyCheckpointError(
                    path, checkpoint.legacy_message(error, recipe)
                ) from None
            state = checkpoint.unflatten(saved_header.pop("state"), arrays, _from_array)
        fix = "Build the engine, guide and optimizer as for the saved run."
        checkpoint.check_match(path, "backend", saved_header["backend"], "pyro", "Load it with numpyro_psvi.")
        current = {"engine": type(self).__name__, "guide": type(self.guide).__name__,
                   "optimizer": _optimizer_name(getattr(self, "optim", None))}  # fmt: skip
        for field, value in current.items():
            if not saved_header.get("legacy"):
                checkpoint.check_match(path, f"{field} classes", saved_header[field], value, fix)
        self._pending_checkpoint = (path, saved_header, state, map_location)
        if self.density is not None:
            self._restore_checkpoint()

    def _read_legacy(self, path: str | os.PathLike) -> tuple[dict, dict]:
        """A checkpoint of psvi before format 1, unpickled (the caller trusts it)."""
        old = torch.load(path, weights_only=False)
        counters = ("num_score_calls", "num_rejected", "consecutive_rejected")
        state = {
            "params": old["param_store"]["params"], "optim": old["optim"], "rng": old["rng"],
            "cuda_rng": None, "extra": old["extra"], "counters": {key: old[key] for key in counters},
        }  # fmt: skip
        return {"legacy": True, "backend": "pyro"}, state

    def _restore_checkpoint(self) -> None:
        """Check the pending checkpoint against the set-up engine and restore it."""
        path, saved_header, state, map_location = self._pending_checkpoint
        self._pending_checkpoint = None
        leaves = self._leaves(model_params=True)
        fix = "Build the engine and guide from the model of the saved run."
        if saved_header.get("legacy"):
            state["params"] = {name: value for name, value in state["params"].items() if name in leaves}
            saved_params = {
                name: [list(value.shape), str(value.dtype)] for name, value in state["params"].items()
            }
        else:
            latent_sites = {name: list(shape) for name, shape in self._latent_shapes.items()}
            checkpoint.check_match(path, "latent sites", saved_header["latent_sites"], latent_sites, fix)
            saved_params = saved_header["params"]
        current = {name: [list(leaf.shape), str(leaf.dtype)] for name, leaf in leaves.items()}
        checkpoint.check_match(path, "params (shape, dtype)", saved_params, current, fix)
        device = next(iter(leaves.values())).device
        if (
            self._module_leaves is not None
            and map_location is not None
            and torch.device(map_location) != device
        ):
            raise ValueError(
                f"With module_local_params the params stay in their modules, on {device}; "
                f"move the model and guide with .to({str(map_location)!r}) before load "
                "instead of passing map_location."
            )
        optim = getattr(self, "optim", None)
        if optim is not None:  # the restored params' optimizers start from the saved state
            forget_optimizers(optim, leaves.values())
        if self._module_leaves is None:
            device = torch.device(map_location) if map_location is not None else device
            params = {name: value.to(device).requires_grad_() for name, value in state["params"].items()}
            store = pyro.get_param_store()
            constraints = store.get_state()["constraints"]
            store.set_state({"params": params, "constraints": {name: constraints[name] for name in params}})
            leaves = self._leaves(model_params=True)
        else:
            with torch.no_grad():
                for name, leaf in leaves.items():
                    leaf.copy_(state["params"][name])
        if optim is not None and state["optim"] is not None:
            load_optimizer_states(optim, leaves, state["optim"])
        counters = state["counters"]
        self.num_score_calls = counters["num_score_calls"]
        self._num_rejected = counters["num_rejected"]
        self._consecutive_rejected = counters["consecutive_rejected"]
        self._load_checkpoint_extra(_to_device(state["extra"], device))
        if self.epoch_order is not None:  # saved without reshuffling: a fresh epoch starts
            # Indices move to each plate's own device when drawn (EpochOrder.next).
            saved_order = state.get("epoch_order") or {"permutations": {}, "positions": {}}
            self.epoch_order.load_state_dict(saved_order)
        pyro.util.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            if len(state["cuda_rng"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            else:
                warnings.warn(
                    f"The checkpoint holds the RNG states of {len(state['cuda_rng'])} CUDA "
                    f"devices and this machine has {torch.cuda.device_count()}; they were not "
                    "restored, so random draws on the GPU differ from the saved run's.",
                    UserWarning, stacklevel=caller_stacklevel(),
                )  # fmt: skip

    def _checkpoint_extra(self) -> dict:
        return {}

    def _load_checkpoint_extra(self, extra: dict) -> None:
        pass

    def run(
        self,
        num_steps: int,
        *args: Any,
        progress_bar: bool = False,
        checkpoint_every: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Take ``num_steps`` steps, reading nothing from the device until the end (unless
        a progress bar or checkpoints need it).

        Parameters
        ----------
        num_steps : int
            Steps to take.
        *args, **kwargs
            The model's and guide's arguments.
        progress_bar : bool
            Show a tqdm bar.
        checkpoint_every, checkpoint_path
            Write a checkpoint (:meth:`save`) to ``checkpoint_path`` after every
            ``checkpoint_every`` steps and at the end (both or neither).

        Returns
        -------
        torch.Tensor
            The per-step losses, shape ``(num_steps,)`` (NaN where rejected).

        Raises
        ------
        RuntimeError
            When more than ``psvi.checks.MAX_REJECTION_RATE`` (half) of the steps were
            rejected, or ``max_consecutive_rejections`` in a row. An exception inside a
            step (``KeyboardInterrupt`` included) leaves the engine at its last completed
            step.

        Warns
        -----
        RuntimeWarning
            When some updates were rejected, or when the run's ``-ELBO`` estimates rose
            (:func:`psvi.checks.rising_loss_message`).
        """
        if num_steps < 1:
            raise ValueError("num_steps must be a positive integer.")
        check_checkpointing(checkpoint_every, checkpoint_path)
        rejected_before = self.num_rejected
        losses = []
        for step in tqdm.trange(num_steps, disable=not progress_bar):
            losses.append(self.update(*args, **kwargs))
            if checkpoint_every is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == num_steps):
                self.save(checkpoint_path)
        rejected = self.num_rejected - rejected_before
        self._check_rejection_streak()
        check_rejection_rate(type(self).__name__, rejected, num_steps)
        if rejected:
            message = rejection_message(type(self).__name__, rejected)
            warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())
        losses = torch.stack(losses)
        if (message := rising_loss_message(type(self).__name__, losses.tolist())) is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())
        return losses

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The ``-ELBO`` estimate of the current guide from fresh particles, as
        ``SVI.evaluate_loss`` returns it.

        Costs ``num_particles`` score calls (not counted in ``num_score_calls``) and
        changes no parameter.
        """
        params, particles, scored = self._fresh_scores(args, kwargs)
        return float(negative_elbo(self.density, params, particles, scored.log_joints, scored.weights))

    def fisher_divergence(self, *args: Any, **kwargs: Any) -> float:
        """The covariance-weighted Fisher divergence of the current guide on fresh
        particles, ``(1/S) sum_s r_s' Cov_q r_s`` with ``r_s`` the difference of the
        guide's and the model's scores (zero exactly when they match), which the steps
        drive down. Same cost as :meth:`evaluate_loss`."""
        params, particles, scored = self._fresh_scores(args, kwargs)
        with torch.no_grad():
            fisher = weighted_fisher(
                self.density, params, params, particles, scored.scores, "covariance", scored.weights
            )  # fmt: skip
        return float(fisher)

    def _fresh_scores(self, args: tuple, kwargs: dict) -> tuple:
        self._prepare(args, kwargs)
        with torch.no_grad():
            params = self._constrain({k: v.detach() for k, v in self._leaves().items()})
        particles, scored = self.score_particles(params, args, kwargs)
        return params, particles, scored


def _reducer(data_parallel: bool | ScoreReducer | None) -> ScoreReducer | None:
    """The engine's reducer: ``None`` fits on this process alone."""
    if isinstance(data_parallel, ScoreReducer):
        return data_parallel
    if data_parallel is None:
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        data_parallel = initialized and torch.distributed.get_world_size() > 1
    return ScoreReducer() if data_parallel else None


def _param_sources(trace: poutine.Trace) -> dict[str, tuple[torch.Tensor, Constraint]]:
    """The unconstrained tensor and constraint of each param site of ``trace`` (a
    constrained value carries its unconstrained tensor, a plain ``nn.Parameter`` is it)."""
    sources = {}
    for name, site in trace.nodes.items():
        if site["type"] == "param":
            value = site["value"]
            leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
            sources[name] = (leaf, site["kwargs"].get("constraint", constraints.real))
    return sources


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensors among the arguments (top level and inside lists, tuples and dicts)."""
    found = []
    for item in (*args, *kwargs.values()):
        if torch.is_tensor(item):
            found.append(item)
        elif isinstance(item, list | tuple):
            found.extend(_tensors(tuple(item), {}))
        elif isinstance(item, dict):
            found.extend(_tensors((), item))
    return found


def _signature(args: tuple, kwargs: dict) -> tuple:
    """Shapes and dtypes of the tensor arguments: a change means re-checking the model."""
    return tuple((tuple(t.shape), t.dtype) for t in _tensors(args, kwargs))


def _cuda_devices(args: tuple, kwargs: dict) -> list[torch.device]:
    return sorted({t.device for t in _tensors(args, kwargs) if t.device.type == "cuda"}, key=str)


def _check_devices(leaves: dict[str, torch.Tensor] | None, args: tuple, kwargs: dict) -> None:
    """The model's tensors must share one device, that of the guide's params (``leaves``)."""
    tensors = [t for t in _tensors(args, kwargs) if t.numel() > 0]
    devices = {t.device for t in tensors}
    if leaves is not None:
        devices |= {leaf.device for leaf in leaves.values()}
    if len(devices) > 1:
        where = ", ".join(f"{tuple(t.shape)} on {t.device}" for t in tensors)
        params = "" if leaves is None else f"; the guide's params are on {next(iter(leaves.values())).device}"
        raise ValueError(
            f"The model's tensors are on different devices ({where}{params}). Move the data "
            "and the model to one device before the first step (the guide follows them)."
        )


def _optimizer_name(optim: Any) -> str | None:
    """The torch optimizer (or LR scheduler) class a Pyro optimizer builds."""
    if optim is None:
        return None
    constructor = getattr(optim, "pt_scheduler_constructor", None) or getattr(
        optim, "pt_optim_constructor", None
    )
    return getattr(constructor, "__name__", type(optim).__name__)


def _to_array(leaf: Any) -> tuple[np.ndarray, str] | None:
    """A checkpoint leaf as a NumPy array and its tag (bfloat16 kept as its bits)."""
    if torch.is_tensor(leaf):
        tensor = leaf.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy(), "torch:bfloat16"
        return tensor.numpy(), "torch"
    if isinstance(leaf, np.ndarray):
        return leaf, "numpy"
    return None


def _from_array(array: np.ndarray, tag: str) -> Any:
    if tag == "numpy":
        return array
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16) if tag == "torch:bfloat16" else tensor


def _to_device(tree: Any, device: torch.device) -> Any:
    """``tree`` (dicts, lists, tuples) with its tensors moved to ``device``."""
    if torch.is_tensor(tree):
        return tree.to(device)
    if isinstance(tree, dict):
        return {key: _to_device(value, device) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        moved = [_to_device(value, device) for value in tree]
        return type(tree)(*moved) if hasattr(tree, "_fields") else type(tree)(moved)
    return tree
