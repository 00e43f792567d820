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

import os
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from torch.distributions import transform_to

from psvi.checks import (
    caller_stacklevel,
    check_latents_match,
    check_rejection_streak,
    local_latent_message,
    rejection_message,
)
from psvi.families import DensityOptions
from pyro_psvi.guides import GuideDensity, Params, guide_family
from pyro_psvi.objective import weighted_fisher
from pyro_psvi.scores import (
    ModelScores,
    at_random_values,
    batch_ratio,
    check_model,
    guess_max_plate_nesting,
    latent_shapes,
    local_latents,
    log_joints,
    model_scores,
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
        Draws for the Monte Carlo KL of guides without a closed form.
    max_consecutive_rejections : int or None
        :meth:`step` raises once this many steps in a row were rejected (``None``:
        never); :meth:`run` checks at its end.
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
    ) -> None:
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}.")
        self.family = guide_family(guide)
        self.family.check_supported()
        self.model = model
        self.guide = guide
        self.num_particles = int(num_particles)
        self.vectorize_particles = bool(vectorize_particles)
        self.max_plate_nesting = max_plate_nesting
        self.density_options = DensityOptions(score_method, int(num_kl_draws))
        self.max_consecutive_rejections = max_consecutive_rejections
        self.num_score_calls = 0
        self.batch_ratio = 1.0  # the model's largest plate size over subsample size
        self.density: GuideDensity | None = None
        self._transforms: dict[str, Any] = {}
        self._num_rejected: torch.Tensor | int = 0
        self._consecutive_rejected: torch.Tensor | int = 0
        self._latent_shapes: dict[str, tuple[int, ...]] = {}
        self._model_param_names: tuple[str, ...] = ()
        self._arg_signature: Any = None
        self._build_density: Callable[[tuple, dict], GuideDensity] | None = None

    @property
    def num_rejected(self) -> int:
        """Steps rejected so far (reading it synchronises with the device)."""
        return int(self._num_rejected)

    # ----------------------------------------------------------------- set-up
    def _setup(self, args: tuple, kwargs: dict) -> None:
        _check_devices(None, args, kwargs)
        model_trace = check_model(self.model, args, kwargs)
        self._latent_shapes = latent_shapes(model_trace)
        self.batch_ratio = batch_ratio(model_trace)
        local = local_latents(model_trace)
        self._check_local_latents(local)
        self._arg_signature = _signature(args, kwargs)
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(model_trace)
        options = self.density_options._replace(max_plate_nesting=self.max_plate_nesting)
        # Set-up draws no random numbers from the run's stream (a resumed run matches).
        with poutine.block(), torch.random.fork_rng(devices=_cuda_devices(args, kwargs)):
            # Running the guide once sets it up and creates its params.
            guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
            prototype = getattr(self.guide, "prototype_trace", None)  # an autoguide's
            if prototype is not None:
                check_latents_match(
                    latent_shapes(prototype), self._latent_shapes,
                    "The guide was built for another model: its latent sites differ from "
                    "this model's",
                    "Build the guide from the model you fit, e.g. AutoNormal(model).",
                )  # fmt: skip
            self._build_density = self.family.setup(
                self.guide, model_trace, guide_trace, args, kwargs, options
            )
            density = self._build_density(args, kwargs)
        constraints = pyro.get_param_store().get_state()["constraints"]
        missing = [name for name in density.param_names if name not in constraints]
        if missing:
            raise RuntimeError(
                f"The guide's params {missing} are not in Pyro's param store; was the "
                "param store cleared after the guide was built? Build a fresh guide."
            )
        self._model_param_names = tuple(
            name for name, site in model_trace.nodes.items() if site["type"] == "param"
        )
        self._transforms = {
            name: transform_to(constraints[name]) for name in (*density.param_names, *self._model_param_names)
        }
        self.density = density
        _check_devices(self._leaves(), args, kwargs)
        if self.vectorize_particles:
            with torch.random.fork_rng(devices=_cuda_devices(args, kwargs)):
                self.vectorize_particles = self._can_vectorize(args, kwargs)

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
            return
        self.density = self._build_density(args, kwargs)
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
                    self.model, self.density, particles, args, kwargs,
                    vectorize=True, check_shapes=True, **common,
                )  # fmt: skip
            # Model code may fail in any way under the extra particle dimension; the
            # sequential pass below then runs the model as written.
            except Exception as error:  # noqa: BLE001
                reason = f"{type(error).__name__}: {error}"
            else:
                one_at_a_time = log_joints(
                    self.model, self.density, particles, args, kwargs, vectorize=False, **common
                )
                scale = one_at_a_time.abs().max().clamp(min=1.0)
                if torch.allclose(vectorized, one_at_a_time, rtol=1e-4, atol=1e-4 * float(scale)):
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
        """The guide's unconstrained param tensors (and the model's, if asked), fetched
        from the param store."""
        store = pyro.get_param_store()
        names = (*self.density.param_names, *(self._model_param_names if model_params else ()))
        return {name: store.get_param(name).unconstrained() for name in names}

    def _constrain(self, unconstrained: dict[str, torch.Tensor]) -> Params:
        return {name: self._transforms[name](value) for name, value in unconstrained.items()}

    # ----------------------------------------------------------------- phases
    def score_particles(
        self, params: Params, args: tuple, kwargs: dict, model_params=()
    ) -> tuple[torch.Tensor, ModelScores]:
        """``S`` particles from the guide at constrained ``params`` and their
        :class:`~pyro_psvi.scores.ModelScores` on one fresh mini-batch shared by the
        particles (with the mean gradient in each tensor of ``model_params``)."""
        with torch.no_grad():
            particles = self.density.sample(params, self.num_particles)
        scored = model_scores(
            self.model, self.density, particles, args, kwargs,
            max_plate_nesting=self.max_plate_nesting, vectorize=self.vectorize_particles,
            model_params=model_params,
        )  # fmt: skip
        return particles, self.reduce_scores(scored)

    def reduce_scores(self, scored: ModelScores) -> ModelScores:
        """Combine the scores of this process's share of the mini-batch (one process:
        nothing to combine). The place where a data-parallel engine all-reduces."""
        return scored

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

    def _check_rejection_streak(self) -> None:
        check_rejection_streak(
            type(self).__name__, int(self._consecutive_rejected), self.max_consecutive_rejections,
            "steps",
        )  # fmt: skip

    # ------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write everything a resumed run needs: the param store, the optimizer's state,
        torch's and Pyro's RNG state and the counters (``torch.save``)."""
        if self.density is None:
            raise RuntimeError("Nothing to save before the first step.")
        optim = getattr(self, "optim", None)
        torch.save(
            {
                "param_store": pyro.get_param_store().get_state(),
                "optim": None if optim is None else optim.get_state(),
                "rng": pyro.util.get_rng_state(),
                "num_score_calls": self.num_score_calls,
                "num_rejected": self.num_rejected,
                "consecutive_rejected": int(self._consecutive_rejected),
                "extra": self._checkpoint_extra(),
            },
            path,
        )

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save` into this engine (build it with the
        same model, guide class and options); the next step continues the saved run."""
        checkpoint = torch.load(path, weights_only=False)
        pyro.get_param_store().set_state(checkpoint["param_store"])
        optim = getattr(self, "optim", None)
        if optim is not None and checkpoint["optim"] is not None:
            optim.set_state(checkpoint["optim"])
        self.num_score_calls = checkpoint["num_score_calls"]
        self._num_rejected = checkpoint["num_rejected"]
        self._consecutive_rejected = checkpoint["consecutive_rejected"]
        self._load_checkpoint_extra(checkpoint["extra"])
        # Set-up draws no random numbers from the run's stream, so this is where the
        # saved run stood.
        pyro.util.set_rng_state(checkpoint["rng"])

    def _checkpoint_extra(self) -> dict:
        return {}

    def _load_checkpoint_extra(self, extra: dict) -> None:
        pass

    def run(self, num_steps: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Take ``num_steps`` steps, reading nothing from the device until the end.

        Returns
        -------
        torch.Tensor
            The per-step losses, shape ``(num_steps,)`` (NaN where rejected).
        """
        if num_steps < 1:
            raise ValueError("num_steps must be a positive integer.")
        rejected_before = self.num_rejected
        losses = torch.stack([self.update(*args, **kwargs) for _ in range(num_steps)])
        rejected = self.num_rejected - rejected_before
        self._check_rejection_streak()
        if rejected:
            message = rejection_message(type(self).__name__, rejected)
            warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())
        return losses

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """Covariance-weighted Fisher divergence of the current guide on fresh particles.

        Costs ``num_particles`` score calls (not counted in ``num_score_calls``) and
        changes no parameter.
        """
        self._prepare(args, kwargs)
        with torch.no_grad():
            params = self._constrain({k: v.detach() for k, v in self._leaves().items()})
        particles, scored = self.score_particles(params, args, kwargs)
        with torch.no_grad():
            fisher = weighted_fisher(
                self.density, params, params, particles, scored.scores, "covariance",
                scored.weights,
            )  # fmt: skip
            return float(fisher)


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
