"""``ProximalScoreVI``: a drop-in replacement for :class:`pyro.infer.SVI`.

One :meth:`ProximalScoreVI.step` draws ``num_particles`` particles from the current
guide ``q_t``, evaluates their mini-batch model scores (one vectorized pass, or one
model call each), takes ``inner_steps`` steps of the Pyro optimizer on the proximal
score-matching objective, and pulls the result back toward ``q_t`` until
``KL(q_t || q_new) <= trust_region * D`` (halving the step). A step whose scores,
objective or parameters are not finite is rejected: the previous parameters are
kept and :attr:`ProximalScoreVI.num_rejected` counts it. Parameters live in Pyro's
param store, so ``guide.median()``, ``guide.quantiles()`` and ``Predictive`` work as
after ``SVI``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive, SplineAutoregressive
from pyro.infer import autoguide
from pyro.optim import PyroOptim
from torch.distributions import ComposeTransform, transform_to

from psvi.checks import (
    autoregressive_flow_advice,
    check_latents_match,
    check_rejection_streak,
    full_covariance_advice,
    local_latent_message,
)
from pyro_psvi.guides import (
    GuideDensity,
    Params,
    UserGuideLayout,
    check_guide_supported,
    guide_density,
    user_guide_density,
    user_guide_layout,
)
from pyro_psvi.objective import (
    WEIGHTINGS,
    diagonal_weighted_fisher,
    fisher_statistics,
    proximal_objective,
    trust_region_fraction,
    weighted_fisher,
)
from pyro_psvi.scores import (
    ModelScores,
    at_random_values,
    check_model,
    guess_max_plate_nesting,
    latent_shapes,
    local_latents,
    log_joints,
    model_scores,
)

_REJECTED_MESSAGE = (
    "{engine} rejected {n} update(s) (non-finite scores, objective or parameters, a "
    "covariance that is not positive definite, or a trust-region step that could not be "
    "made small enough); the parameters were kept as they were. Likely causes: a "
    "learning rate too large, a model returning -inf, or badly scaled data."
)


class ScoreEngine:
    """What every engine fitting a Pyro autoguide from model scores shares.

    Set-up on the first call (model checks, the guide's params and density, the
    particle-vectorization probe), the guide's params read from and written to Pyro's
    param store, :meth:`step` / :meth:`run` over a subclass's :meth:`update`, and
    :meth:`evaluate_loss`. Subclasses: :class:`ProximalScoreVI` and the baselines in
    :mod:`pyro_psvi.baselines`.
    """

    def __init__(
        self,
        model: Callable,
        guide: autoguide.AutoGuide,
        *,
        num_particles: int,
        vectorize_particles: bool = True,
        max_plate_nesting: int | None = None,
        score_method: str = "closed_form",
        max_consecutive_rejections: int | None = 20,
    ) -> None:
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}.")
        check_guide_supported(guide)
        self.model = model
        self.guide = guide
        self.num_particles = int(num_particles)
        self.vectorize_particles = bool(vectorize_particles)
        self.max_plate_nesting = max_plate_nesting
        self.score_method = score_method
        self.max_consecutive_rejections = max_consecutive_rejections
        self.num_score_calls = 0
        self.density: GuideDensity | None = None
        self._transforms: dict[str, Any] = {}
        self._num_rejected: torch.Tensor | int = 0
        self._consecutive_rejected: torch.Tensor | int = 0
        self._latent_shapes: dict[str, tuple[int, ...]] = {}
        self._model_param_names: tuple[str, ...] = ()
        self._arg_signature: Any = None
        self._user_guide_layout: UserGuideLayout | None = None

    @property
    def num_rejected(self) -> int:
        """Steps rejected so far (reading it synchronises with the device)."""
        return int(self._num_rejected)

    # ----------------------------------------------------------------- set-up
    def _setup(self, args: tuple, kwargs: dict) -> None:
        _check_devices(None, args, kwargs)
        model_trace = check_model(self.model, args, kwargs)
        self._latent_shapes = latent_shapes(model_trace)
        self._check_local_latents(local_latents(model_trace))
        self._arg_signature = _signature(args, kwargs)
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(model_trace)
        # Set-up draws no random numbers from the run's stream (a resumed run matches).
        with poutine.block(), torch.random.fork_rng(devices=_cuda_devices(args, kwargs)):
            # Running the guide once sets it up and creates its params.
            if isinstance(self.guide, autoguide.AutoGuide):
                self.guide(*args, **kwargs)
                check_latents_match(
                    latent_shapes(self.guide.prototype_trace), self._latent_shapes,
                    "The guide was built for another model: its latent sites differ from "
                    "this model's",
                    "Build the guide from the model you fit, e.g. AutoNormal(model).",
                )  # fmt: skip
                density = guide_density(self.guide, self.score_method)
            else:
                guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
                self._user_guide_layout = user_guide_layout(self.guide, model_trace, guide_trace)
                density = self._user_guide_density(args, kwargs)
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
        """Local latents in a subsampled plate need AutoNormal (per-member params)."""
        if local and not isinstance(self.guide, autoguide.AutoNormal):
            name, plate = next(iter(local.items()))
            raise NotImplementedError(local_latent_message(name, plate, type(self.guide).__name__))

    def _user_guide_density(self, args: tuple, kwargs: dict) -> GuideDensity:
        return user_guide_density(self.guide, self._user_guide_layout, args, kwargs, self.max_plate_nesting)

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        """Set up on the first call; later, re-check the model when the argument shapes
        change (and run a user-written guide with this call's arguments)."""
        if self.density is None:
            self._setup(args, kwargs)
            return
        if self._user_guide_layout is not None:
            self.density = self._user_guide_density(args, kwargs)
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
            stacklevel=4,
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

    def _particles_and_scores(
        self, params: Params, args: tuple, kwargs: dict, model_params=()
    ) -> tuple[torch.Tensor, ModelScores]:
        """``S`` particles from the guide at ``params`` and their :class:`ModelScores` on
        one fresh mini-batch shared by the particles."""
        with torch.no_grad():
            particles = self.density.sample(params, self.num_particles)
        return particles, model_scores(
            self.model, self.density, particles, args, kwargs,
            max_plate_nesting=self.max_plate_nesting, vectorize=self.vectorize_particles,
            model_params=model_params,
        )  # fmt: skip

    # ------------------------------------------------------------------ steps
    def update(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One step; returns its loss as a 0-dim tensor without a host sync."""
        raise NotImplementedError

    def step(self, *args: Any, **kwargs: Any) -> float:
        """One step (:meth:`update`), its loss read as a float; NaN when rejected."""
        loss = float(self.update(*args, **kwargs))
        if loss != loss:
            message = _REJECTED_MESSAGE.format(engine=type(self).__name__, n=1)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self._check_rejection_streak()
        return loss

    def _record(self, accept: torch.Tensor) -> None:
        """Count one step (on the device: no sync)."""
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
            message = _REJECTED_MESSAGE.format(engine=type(self).__name__, n=rejected)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return losses

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """Covariance-weighted Fisher divergence of the current guide on fresh particles.

        Costs ``num_particles`` score calls (not counted in ``num_score_calls``) and
        changes no parameter.
        """
        self._prepare(args, kwargs)
        with torch.no_grad():
            params = self._constrain({k: v.detach() for k, v in self._leaves().items()})
        particles, scored = self._particles_and_scores(params, args, kwargs)
        with torch.no_grad():
            fisher = weighted_fisher(
                self.density, params, params, particles, scored.scores, "covariance",
                scored.weights,
            )  # fmt: skip
            return float(fisher)


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
        AutoNormalizingFlow, or a user-written guide with one ``pyro.sample`` site per
        latent site (nested autograd, Monte Carlo KL).
    optim : pyro.optim.PyroOptim
        Any Pyro optimizer (Adam, ClippedAdam, the LR schedulers).
    num_particles : int
        Particles ``S`` per step, hence model score calls per step.
    inner_steps : int
        Optimizer steps ``K`` on each proximal objective (they cost no score calls).
    prox_weight : float
        Weight ``1/eta`` of ``KL(q_t || q)`` in the objective.
    weighting : {"covariance", "identity"}
        Residual weighting ``W_t``: the covariance of ``q_t`` (scale-free, the
        default) or the identity (the plain score-matching loss).
    trust_region : float or None
        Per-dimension KL budget: each step is pulled back toward ``q_t`` until
        ``KL(q_t || q_new) <= trust_region * D``; ``None`` turns it off.
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
        Trust-region halvings before the step is rejected.

    max_consecutive_rejections : int or None
        :meth:`step` raises once this many steps in a row were rejected (``None``:
        never); :meth:`run` checks at its end.

    Notes
    -----
    A rejected step restores the parameters and the optimizer's state (a copy of the
    optimizer's state is taken each step for that).
    """

    def __init__(
        self,
        model: Callable,
        guide: autoguide.AutoGuide,
        optim: PyroOptim,
        *,
        num_particles: int = 4,
        inner_steps: int = 20,
        prox_weight: float = 10.0,
        weighting: str = "covariance",
        trust_region: float | None = 0.02,
        vectorize_particles: bool = True,
        max_plate_nesting: int | None = None,
        score_method: str = "closed_form",
        max_halvings: int = 12,
        max_consecutive_rejections: int | None = 20,
    ) -> None:
        if int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be a positive integer, got {inner_steps}.")
        if not prox_weight >= 0:
            raise ValueError(f"prox_weight (1/eta) must be >= 0, got {prox_weight}.")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
        if trust_region is not None and not trust_region > 0:
            raise ValueError(f"trust_region must be positive or None, got {trust_region}.")
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim must be a pyro.optim optimizer (e.g. pyro.optim.Adam({{'lr': 1e-2}})), "
                f"got {type(optim).__name__}; wrap torch optimizers with pyro.optim.PyroOptim."
            )
        super().__init__(
            model, guide, num_particles=num_particles, vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting, score_method=score_method,
            max_consecutive_rejections=max_consecutive_rejections,
        )  # fmt: skip
        self.optim = optim
        self.inner_steps = int(inner_steps)
        self.prox_weight = float(prox_weight)
        self.weighting = weighting
        self.trust_region = trust_region
        self.max_halvings = int(max_halvings)

    def _setup(self, args: tuple, kwargs: dict) -> None:
        super()._setup(args, kwargs)
        advice = full_covariance_advice(self.density.latent_dim, self.num_particles)
        if isinstance(self.guide, autoguide.AutoMultivariateNormal) and advice:
            warnings.warn(advice, UserWarning, stacklevel=4)
        advice = autoregressive_flow_advice(self.density.latent_dim)
        if _has_autoregressive_layers(self.guide) and advice:
            warnings.warn(advice, UserWarning, stacklevel=4)

    def update(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One update: ``S`` score calls and ``K`` optimizer steps.

        Returns
        -------
        torch.Tensor
            0-dim, on the params' device (no host sync): the weighted Fisher divergence
            ``(1/S) sum_s r_s' W_t r_s`` (``W_t`` as ``weighting`` says) of ``q_t`` on
            this step's particles and mini-batch (zero exactly when the guide's score
            matches the model's); NaN when the step was rejected.
        """
        self._prepare(args, kwargs)
        density = self.density
        leaves = self._leaves(model_params=True)
        guide_leaves = [leaves[name] for name in density.param_names]
        model_leaves = [leaves[name] for name in self._model_param_names]
        with torch.no_grad():
            start = {name: leaf.detach().clone() for name, leaf in leaves.items()}
            params_t = self._constrain(start)
        particles, scored = self._particles_and_scores(params_t, args, kwargs, model_leaves)
        log_joints, scores, param_grads, weights, active_dim = scored
        del scored  # its (S, D) scores are freed with ``scores`` below
        scores_ok = torch.isfinite(log_joints).all() & torch.isfinite(scores).all()
        scores = torch.where(scores_ok, scores, torch.zeros_like(scores))
        # A diagonal Gaussian guide needs the particles only through per-coordinate sums.
        stats = fisher_statistics(density, params_t, particles, scores)
        with torch.no_grad():
            if stats is None:
                loss = weighted_fisher(
                    density, params_t, params_t, particles, scores, self.weighting, weights
                )
            else:
                loss = diagonal_weighted_fisher(density, params_t, params_t, stats, self.weighting, weights)
                particles = scores = None  # free the (S, D) particles and scores

        # Monte Carlo KLs (flow guides) use common random numbers within the step.
        kl_seed = None if density.closed_form else int(torch.randint(0, 2**62, ()))
        leaf_list = list(leaves.values())
        saved_optimizer_state = [
            {k: v.clone() for k, v in state.items()} for state in self._optimizer_state(leaf_list)
        ]
        for _ in range(self.inner_steps):
            objective, _ = proximal_objective(
                density, self._constrain(leaves), params_t, particles, scores,
                prox_weight=self.prox_weight, weighting=self.weighting, weights=weights,
                kl_seed=kl_seed, stats=stats,
            )  # fmt: skip
            grads = torch.autograd.grad(objective, guide_leaves)
            # A non-finite objective must not reach the optimizer's moments: zero it.
            finite = torch.isfinite(objective)
            for leaf, grad in zip(guide_leaves, grads, strict=True):
                leaf.grad = torch.where(finite, grad, torch.zeros_like(grad))
            # Model params ascend the expected log joint, linearized at theta_t: their
            # gradient is the particles' mean gradient (no extra score calls).
            for leaf, grad in zip(model_leaves, param_grads, strict=True):
                leaf.grad = torch.where(scores_ok, -grad, torch.zeros_like(grad))
            self.optim(leaf_list)
            for leaf in leaf_list:
                leaf.grad = None

        with torch.no_grad():
            end = {name: leaf.detach() for name, leaf in leaves.items()}  # no copy: read before written

            def lerp(frac: float) -> dict[str, torch.Tensor]:
                return {name: torch.lerp(start[name], end[name], frac) for name in start}

            def kl_at(frac: float) -> torch.Tensor:
                return density.kl(params_t, self._constrain(lerp(frac)), kl_seed)

            lazy = loss.device.type == "cpu"
            if self.trust_region is None:
                frac = torch.isfinite(kl_at(1.0)).to(loss.dtype)
            else:
                max_kl = self.trust_region * active_dim
                frac = trust_region_fraction(kl_at, max_kl, self.max_halvings, lazy=lazy)
            frac = frac.to(loss.device)
            accept = (frac > 0) & scores_ok & torch.isfinite(loss)
            for value in end.values():
                accept &= torch.isfinite(value).all()
            for name, leaf in leaves.items():
                leaf.copy_(torch.where(accept, torch.lerp(start[name], end[name], frac), start[name]))
            # A rejected step also leaves the optimizer as it was (state created by this
            # step goes back to zeros, i.e. a fresh optimizer).
            for before, after in zip(saved_optimizer_state, self._optimizer_state(leaf_list), strict=True):
                for key, value in after.items():
                    old = before.get(key, torch.zeros_like(value))
                    value.copy_(torch.where(accept.to(value.device), value, old))
        self._record(accept)
        return torch.where(accept, loss, torch.full_like(loss, float("nan")))

    def _optimizer_state(self, leaves: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The tensors of the torch optimizer state of each leaf (empty before its first step)."""
        states = []
        for leaf in leaves:
            optimizer = self.optim.optim_objs.get(leaf)
            optimizer = getattr(optimizer, "optimizer", optimizer)  # LR schedulers wrap one
            state = {} if optimizer is None else optimizer.state.get(leaf, {})
            states.append({k: v for k, v in state.items() if torch.is_tensor(v)})
        return states


def _has_autoregressive_layers(guide: Any) -> bool:
    """Whether a flow guide has layers that invert in D sequential passes."""
    if not isinstance(guide, autoguide.AutoNormalizingFlow):
        return False
    flow = guide.transform
    parts = flow.parts if isinstance(flow, ComposeTransform) else [flow]
    return any(isinstance(part, AffineAutoregressive | SplineAutoregressive) for part in parts)


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
