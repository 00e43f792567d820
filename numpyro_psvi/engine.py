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
from numpyro.handlers import seed, trace
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.svi import SVIRunResult

from numpyro_psvi.guides import GuideDensity, guide_family
from numpyro_psvi.objective import weighted_fisher
from numpyro_psvi.scores import (
    ModelScores,
    batch_ratio,
    check_model,
    coordinate_weights,
    draw_plate_indices,
    latent_shapes,
    make_score_and_param_grad_fn,
    make_score_fn,
    model_param_names,
    subsampled_plates,
)
from psvi.checks import (
    check_latents_match,
    check_rejection_streak,
    local_latent_message,
    rejection_message,
)
from psvi.families import DensityOptions


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
    """

    optim_state: Any
    rng_key: jax.Array
    num_score_calls: jax.Array
    num_rejected: jax.Array
    consecutive_rejected: jax.Array
    averages: Any = None


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
        Draws for the Monte Carlo KL of guides without a closed form.
    max_consecutive_rejections : int or None
        :meth:`run` raises once this many updates in a row were rejected (``None``:
        never); it checks at the end of each progress-bar chunk, or at the end.
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
        local = check_model(self.model, model_seed, args, all_kwargs)
        self._check_local_latents(local)
        self._model_param_names = model_param_names(self.model, args, all_kwargs)
        self.batch_ratio = batch_ratio(self.model, args, all_kwargs)
        self._check_model_params()
        self._build_density = self.family.setup(
            self.guide, self.model, args, all_kwargs, self.density_options
        )
        svi_state = self._svi.init(rng_key, *args, init_params=init_params, **kwargs)
        self.constrain_fn = self._svi.constrain_fn
        self._latent_shapes = latent_shapes(self.model, args, all_kwargs)
        check_latents_match(
            self._guide_latent_shapes(guide_seed, args, all_kwargs), self._latent_shapes,
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
        return EngineState(self._initial_optim_state(optim_state), svi_state.rng_key, zero, zero, zero)

    def _guide_latent_shapes(self, guide_seed: jax.Array, args: tuple, kwargs: dict) -> dict:
        guide_trace = getattr(self.guide, "prototype_trace", None)
        if guide_trace is None:  # a user-written guide
            guide_trace = trace(seed(self.guide, guide_seed)).get_trace(*args, **kwargs)
        return {
            name: tuple(jnp.shape(site["value"]))
            for name, site in guide_trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        }

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
    ) -> tuple[jax.Array, ModelScores]:
        """``S`` particles from the guide at constrained ``params`` (constants), and their
        :class:`~numpyro_psvi.scores.ModelScores` from one pass (or one per particle)
        sharing the mini-batch of ``key_batch``; ``model_params`` are the model's
        unconstrained ``numpyro.param`` values (their mean gradient comes along)."""
        particles = lax.stop_gradient(density.sample(params, key_particles, self.num_particles))
        local_plates = density.local_plates
        plates = subsampled_plates(self.model, args, kwargs) if local_plates else {}
        indices = draw_plate_indices(plates, key_batch) if plates else None
        if not model_params:
            score_fn = make_score_fn(
                self.model, density.unpack, args, kwargs, local_plates, self.vectorize_particles
            )
            log_joints, scores = score_fn(particles, key_batch, indices)
            param_grads = {}
        else:
            score_fn = make_score_and_param_grad_fn(
                self.model, density.unpack, self.constrain_fn, args, kwargs, local_plates,
                self.vectorize_particles,
            )  # fmt: skip
            log_joints, scores, param_grads = score_fn(particles, model_params, key_batch, indices)
        weights, active_dim = None, density.latent_dim
        if local_plates:
            shapes = jax.eval_shape(density.unpack, particles[0])
            shapes = {name: shape.shape for name, shape in shapes.items()}
            weights, active_dim = coordinate_weights(local_plates, shapes, indices or {})
        if weights is not None:
            # A local latent's own score came out N/B times too large (plate scale).
            scores = scores / jnp.where(weights > 0, weights, 1.0)
        scored = ModelScores(log_joints, scores, param_grads, weights, active_dim)
        return particles, self.reduce_scores(scored)

    def reduce_scores(self, scored: ModelScores) -> ModelScores:
        """Combine the scores of this process's share of the mini-batch (one process:
        nothing to combine). The place where a data-parallel engine all-reduces."""
        return scored

    def record(
        self, state: EngineState, candidate: Any, accept: jax.Array, rng_key: jax.Array
    ) -> EngineState:
        """The next state: ``candidate`` if ``accept``, else the old one exactly; the
        counters advanced."""
        optim_state = jax.tree.map(lambda old, new: jnp.where(accept, new, old), state.optim_state, candidate)
        return state._replace(
            optim_state=optim_state,
            rng_key=rng_key,
            num_score_calls=state.num_score_calls + self.num_particles,
            num_rejected=state.num_rejected + (~accept).astype(jnp.int32),
            consecutive_rejected=jnp.where(accept, 0, state.consecutive_rejected + 1),
        )

    def update(self, state: EngineState, *args: Any, **kwargs: Any) -> tuple[EngineState, jax.Array]:
        """One update (pure, jittable): the next state and the update's loss (NaN when
        the update was rejected)."""
        raise NotImplementedError

    # --------------------------------------------------------- run, evaluate
    def evaluate(self, state: EngineState, *args: Any, **kwargs: Any) -> jax.Array:
        """Covariance-weighted Fisher divergence of the current guide on fresh particles.

        Uses the key that the next :meth:`update` would use, as ``SVI.evaluate`` does;
        costs ``num_particles`` score calls (not counted in the state).
        """
        kwargs, density = self._prepare(args, kwargs)
        _, key_particles, key_batch, _ = random.split(state.rng_key, 4)
        params = self.get_params(state)
        particles, scored = self.score_particles(
            density, params, self._model_params(state), key_particles, key_batch, args, kwargs
        )
        return weighted_fisher(
            density, params, params, particles, scored.scores, "covariance", scored.weights
        )

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
        **kwargs: Any,
    ) -> SVIRunResult:
        """Run ``num_steps`` updates, like ``SVI.run``.

        With ``progress_bar=True`` a jitted update runs in a Python loop under tqdm
        (losses fetched from the device in chunks); otherwise the loop is one
        ``lax.scan``.

        Returns
        -------
        numpyro.infer.svi.SVIRunResult
            ``params`` (constrained), the final ``state`` (an :class:`EngineState`, with
            ``num_score_calls``) and the per-step ``losses``.
        """
        if num_steps < 1:
            raise ValueError("num_steps must be a positive integer.")
        if init_state is None:
            state = self.init(rng_key, *args, init_params=init_params, **kwargs)
        else:
            state = init_state

        def body_fn(state, _):
            return self.update(state, *args, **kwargs)

        if progress_bar:
            state, losses = self._run_with_progress_bar(jax.jit(body_fn), state, num_steps)
        else:
            state, losses = jax.jit(lambda s: lax.scan(body_fn, s, None, length=num_steps))(state)
        self._check_rejection_streak(state)
        rejected = int(state.num_rejected)
        if rejected:
            message = rejection_message(type(self).__name__, rejected)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return SVIRunResult(self.get_params(state), state, losses)

    def _run_with_progress_bar(self, jitted_body: Callable, state: EngineState, num_steps: int):
        losses = []
        chunk = max(num_steps // 20, 1)
        with tqdm.trange(1, num_steps + 1) as bar:
            for i in bar:
                state, loss = jitted_body(state, None)
                losses.append(loss)
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


def save_state(path: str | os.PathLike, state: Any) -> None:
    """Write an engine state (an :class:`EngineState`) to ``path``.

    Everything a resumed run needs is in the state (params, optimizer state, key,
    counters), so ``engine.run(..., init_state=load_state(path))`` continues exactly
    where the saved run stopped.
    """

    def to_host(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            return _TypedKey(np.asarray(random.key_data(leaf)), str(random.key_impl(leaf)))
        return np.asarray(leaf)

    with open(path, "wb") as f:
        pickle.dump(jax.tree.map(to_host, state), f)


def load_state(path: str | os.PathLike) -> Any:
    """Read a state written by :func:`save_state`."""
    with open(path, "rb") as f:
        state = pickle.load(f)

    def to_device(leaf):
        if isinstance(leaf, _TypedKey):
            return random.wrap_key_data(jnp.asarray(leaf.data), impl=leaf.impl)
        return jnp.asarray(leaf)

    return jax.tree.map(to_device, state, is_leaf=lambda x: isinstance(x, _TypedKey))


class _TypedKey(NamedTuple):
    """A new-style JAX key as raw data and the name of its implementation."""

    data: np.ndarray
    impl: str
