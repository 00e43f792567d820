"""``ProximalScoreVI``: a drop-in replacement for :class:`numpyro.infer.SVI`.

The engine is a thin wrapper over two pure functions in the style of NumPyro's
``SVI``: :meth:`ProximalScoreVI.init` builds a :class:`PSVIState` and
:meth:`ProximalScoreVI.update` maps a state to the next one. One update draws
``num_particles`` particles from the current guide ``q_t``, evaluates their
mini-batch model scores in one vectorized pass, takes ``inner_steps`` optimizer
steps on the proximal score-matching objective, and pulls the result back toward
``q_t`` until ``KL(q_t || q_new) <= trust_region * D`` (halving the step). A step
whose scores, objective or parameters are not finite is rejected: the previous
parameters and optimizer state are kept and ``PSVIState.num_rejected`` counts it.
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
import tqdm
from jax import lax, random
from jax.flatten_util import ravel_pytree
from numpyro.handlers import seed, trace
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoGuide,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.infer.svi import SVIRunResult

from numpyro_psvi.guides import check_guide_supported, check_user_guide, guide_density
from numpyro_psvi.objective import (
    WEIGHTINGS,
    diagonal_weighted_fisher,
    fisher_statistics,
    lerp_tree,
    proximal_objective,
    trust_region_fraction,
    weighted_fisher,
)
from numpyro_psvi.scores import (
    ModelScores,
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
    autoregressive_flow_advice,
    check_latents_match,
    check_rejection_streak,
    full_covariance_advice,
    local_latent_message,
)


class PSVIState(NamedTuple):
    """State of :class:`ProximalScoreVI`.

    Attributes
    ----------
    optim_state
        The optimizer's state; it holds the unconstrained guide params.
    rng_key : jax.Array
        Key for the next update.
    num_score_calls : jax.Array
        Model score evaluations made so far (``num_particles`` per update).
    num_rejected : jax.Array
        Updates rejected because a score, the objective or the new parameters were
        not finite (the state was left as it was).
    consecutive_rejected : jax.Array
        Length of the current run of rejected updates (0 after an accepted one).
    """

    optim_state: Any
    rng_key: jax.Array
    num_score_calls: jax.Array
    num_rejected: jax.Array
    consecutive_rejected: jax.Array


def _break_zero_cov_factor(guide, params: dict, init_params: dict | None, rng_key) -> dict:
    """Replace NumPyro's all-zero initial ``cov_factor`` by a small random one.

    The guide's score depends on the factor ``W`` only through ``W W'``, so
    ``W = 0`` is a stationary point of the score-matching objective: a zero factor
    would never move (the ELBO's reparameterized gradient escapes it; this objective
    does not). Pyro initializes the factor randomly; so do we, with
    ``N(0, 0.25 / rank)`` entries.
    """
    name = f"{guide.prefix}_cov_factor"
    if (init_params and name in init_params) or bool(jnp.any(params[name] != 0)):
        return params
    rank = params[name].shape[-1]
    noise = random.normal(random.fold_in(rng_key, 1), params[name].shape, params[name].dtype)
    return {**params, name: 0.5 / rank**0.5 * noise}


class ProximalScoreVI:
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
        with a tractable density (e.g. AutoIAFNormal), or a user-written guide with one
        ``numpyro.sample`` site per latent site (nested autodiff, Monte Carlo KL).
    optim
        A ``numpyro.optim`` optimizer or an optax ``GradientTransformation``.
    num_particles : int
        Particles ``S`` per update, hence score calls per update.
    inner_steps : int
        Optimizer steps ``K`` on each proximal objective (they cost no score calls).
    prox_weight : float
        Weight ``1/eta`` of ``KL(q_t || q)`` in the objective.
    weighting : {"covariance", "identity"}
        Residual weighting ``W_t``: the covariance of ``q_t`` (scale-free, the
        default) or the identity (the plain score-matching loss).
    trust_region : float or None
        Per-dimension KL budget: each update is pulled back toward ``q_t`` until
        ``KL(q_t || q_new) <= trust_region * D``; ``None`` turns it off.
    vectorize_particles : bool
        Score the particles in one batched pass (``vmap``, the default) or one pass per
        particle (``lax.map``, as Pyro's ``vectorize_particles=False``): batched
        convolutions over per-particle weights can be slow on CPU; which is faster
        depends on the network (docs/scale.md).
    score_method : {"closed_form", "autodiff"}
        How the guide's score is computed for Gaussian guides.
    num_kl_draws : int
        Draws for the Monte Carlo KL of guides without a closed form.
    max_halvings : int
        Trust-region halvings before the step is rejected.
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
        num_particles: int = 4,
        inner_steps: int = 20,
        prox_weight: float = 10.0,
        weighting: str = "covariance",
        trust_region: float | None = 0.02,
        vectorize_particles: bool = True,
        score_method: str = "closed_form",
        num_kl_draws: int = 256,
        max_halvings: int = 12,
        max_consecutive_rejections: int | None = 20,
        **static_kwargs: Any,
    ) -> None:
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}.")
        if int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be a positive integer, got {inner_steps}.")
        if not prox_weight >= 0:
            raise ValueError(f"prox_weight (1/eta) must be >= 0, got {prox_weight}.")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
        if trust_region is not None and not trust_region > 0:
            raise ValueError(f"trust_region must be positive or None, got {trust_region}.")
        check_guide_supported(guide)
        self.model = model
        self.guide = guide
        # NumPyro's SVI converts the optimizer (numpyro.optim, jax or optax) and later
        # collects the guide params in init; ProximalScoreVI reuses both.
        self._svi = SVI(model, guide, optim, Trace_ELBO(), **static_kwargs)
        self.optim = self._svi.optim
        self.num_particles = int(num_particles)
        self.inner_steps = int(inner_steps)
        self.prox_weight = float(prox_weight)
        self.weighting = weighting
        self.trust_region = trust_region
        self.vectorize_particles = bool(vectorize_particles)
        self.score_method = score_method
        self.num_kl_draws = int(num_kl_draws)
        self.max_halvings = int(max_halvings)
        self.max_consecutive_rejections = max_consecutive_rejections
        self.static_kwargs = static_kwargs
        self.constrain_fn: Callable | None = None
        self.density = None
        self._latent_shapes: dict | None = None
        self._model_param_names: tuple[str, ...] = ()

    # ------------------------------------------------------------------ init
    def init(self, rng_key: jax.Array, *args: Any, init_params: dict | None = None, **kwargs: Any):
        """Return the initial :class:`PSVIState` (runs the guide once to set it up).

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
        local = check_model(self.model, model_seed, args, {**kwargs, **self.static_kwargs})
        if local and not isinstance(self.guide, AutoNormal):
            name, plate = next(iter(local.items()))
            raise NotImplementedError(local_latent_message(name, plate, type(self.guide).__name__))
        if not isinstance(self.guide, AutoGuide):
            check_user_guide(self.guide, self.model, args, {**kwargs, **self.static_kwargs})
        # SVI.init collects the guide params and their constraints, so get_params
        # returns exactly what SVI.get_params would.
        svi_state = self._svi.init(rng_key, *args, init_params=init_params, **kwargs)
        self.constrain_fn = self._svi.constrain_fn
        self._latent_shapes = latent_shapes(self.model, args, {**kwargs, **self.static_kwargs})
        self._model_param_names = model_param_names(self.model, args, {**kwargs, **self.static_kwargs})
        if isinstance(self.guide, AutoGuide):
            guide_trace = self.guide.prototype_trace
        else:
            guide_trace = trace(seed(self.guide, guide_seed)).get_trace(*args, **kwargs, **self.static_kwargs)
        guide_shapes = {
            name: tuple(jnp.shape(site["value"]))
            for name, site in guide_trace.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
        check_latents_match(
            guide_shapes, self._latent_shapes,
            "The guide was built for another model: its latent sites differ from this model's",
            "Build the guide from the model you fit, e.g. AutoNormal(model).",
        )  # fmt: skip
        optim_state, rng_key = svi_state.optim_state, svi_state.rng_key
        if isinstance(self.guide, AutoLowRankMultivariateNormal):
            params = _break_zero_cov_factor(
                self.guide, self.optim.get_params(optim_state), init_params, guide_seed
            )
            optim_state = self.optim.init(params)
        self.density = self._density(args, {**kwargs, **self.static_kwargs})
        advice = full_covariance_advice(self.density.latent_dim, self.num_particles)
        if isinstance(self.guide, AutoMultivariateNormal) and advice:
            warnings.warn(advice, UserWarning, stacklevel=2)
        advice = autoregressive_flow_advice(self.density.latent_dim)
        if isinstance(self.guide, AutoIAFNormal) and advice:
            warnings.warn(advice, UserWarning, stacklevel=2)
        zero = jnp.zeros((), jnp.int32)
        return PSVIState(optim_state, rng_key, zero, zero, zero)

    def get_params(self, state: PSVIState) -> dict:
        """Constrained guide params, exactly as ``SVI.get_params`` returns them."""
        self._check_initialized()
        return self.constrain_fn(self.optim.get_params(state.optim_state))

    # ---------------------------------------------------------------- update
    def update(self, state: PSVIState, *args: Any, **kwargs: Any) -> tuple[PSVIState, jax.Array]:
        """One iteration: ``S`` score calls and ``K`` inner optimizer steps (pure, jittable).

        Returns
        -------
        (PSVIState, jax.Array)
            The next state and the loss: the weighted Fisher divergence
            ``(1/S) sum_s r_s' W_t r_s`` (``W_t`` as ``weighting`` says) of ``q_t``
            on this iteration's particles and
            mini-batch (zero exactly when the guide's score matches the model's);
            NaN when the step was rejected.
        """
        self._check_initialized()
        kwargs = {**kwargs, **self.static_kwargs}
        check_latents_match(
            self._latent_shapes, latent_shapes(self.model, args, kwargs),
            "With these arguments the model's latent sites differ from those at init",
            "Call init again with the new arguments: the guide's shapes are fixed there.",
        )  # fmt: skip
        density = self._density(args, kwargs)
        rng_key, key_particles, key_batch, key_kl = random.split(state.rng_key, 4)
        unconstrained_t = self.optim.get_params(state.optim_state)
        params_t = self.constrain_fn(unconstrained_t)
        particles, scored = self._particles_and_scores(
            density, unconstrained_t, key_particles, key_batch, args, kwargs
        )
        log_joints, model_scores, weights = scored.log_joints, scored.scores, scored.weights
        # A diagonal Gaussian guide needs the particles only through per-coordinate sums.
        stats = fisher_statistics(density, params_t, particles, model_scores)
        if stats is None:
            loss = weighted_fisher(
                density, params_t, params_t, particles, model_scores, self.weighting, weights
            )
        else:
            loss = diagonal_weighted_fisher(density, params_t, params_t, stats, self.weighting, weights)

        def objective(unconstrained):
            value, terms = proximal_objective(
                density,
                self.constrain_fn(unconstrained),
                params_t,
                particles,
                model_scores,
                key_kl,
                prox_weight=self.prox_weight,
                weighting=self.weighting,
                weights=weights,
                stats=stats,
            )
            # Model params ascend the expected log joint, linearized at theta_t: their
            # gradient is the particles' mean gradient (no extra score calls).
            for name, grad in scored.param_grads.items():
                products = jax.tree.map(jnp.vdot, lax.stop_gradient(grad), unconstrained[name])
                value = value - sum(jax.tree.leaves(products))
            return value, terms

        def inner_step(_, optim_state):
            return self.optim.eval_and_update(objective, optim_state)[1]

        optim_state = lax.fori_loop(0, self.inner_steps, inner_step, state.optim_state)
        unconstrained_new = self.optim.get_params(optim_state)

        def kl_at(frac):
            moved = lerp_tree(unconstrained_t, unconstrained_new, frac)
            return density.kl(params_t, self.constrain_fn(moved), key_kl)

        if self.trust_region is None:
            finite_kl = jnp.isfinite(kl_at(jnp.asarray(1.0)))
            frac = jnp.where(finite_kl, 1.0, 0.0)
        else:
            max_kl = self.trust_region * scored.active_dim
            frac = trust_region_fraction(kl_at, max_kl, self.max_halvings)
        accept = (frac > 0) & jnp.isfinite(loss) & jnp.all(jnp.isfinite(log_joints))
        accept &= jnp.all(jnp.isfinite(ravel_pytree(unconstrained_new)[0]))
        candidate = lerp_tree(state.optim_state, optim_state, frac)
        optim_state = jax.tree.map(lambda old, new: jnp.where(accept, new, old), state.optim_state, candidate)
        new_state = PSVIState(
            optim_state,
            rng_key,
            state.num_score_calls + self.num_particles,
            state.num_rejected + (~accept).astype(jnp.int32),
            jnp.where(accept, 0, state.consecutive_rejected + 1),
        )
        # As SVI.stable_update does, a rejected step reports a NaN loss.
        return new_state, jnp.where(accept, loss, jnp.nan)

    def evaluate(self, state: PSVIState, *args: Any, **kwargs: Any) -> jax.Array:
        """Covariance-weighted Fisher divergence of the current guide on fresh particles.

        Uses the key that the next :meth:`update` would use, as ``SVI.evaluate`` does;
        costs ``num_particles`` score calls (not counted in the state).
        """
        self._check_initialized()
        kwargs = {**kwargs, **self.static_kwargs}
        _, key_particles, key_batch, _ = random.split(state.rng_key, 4)
        params = self.get_params(state)
        density = self._density(args, kwargs)
        particles, scored = self._particles_and_scores(
            density, self.optim.get_params(state.optim_state), key_particles, key_batch, args, kwargs
        )
        return weighted_fisher(
            density, params, params, particles, scored.scores, "covariance", scored.weights
        )

    # ------------------------------------------------------------------- run
    def run(
        self,
        rng_key: jax.Array,
        num_steps: int,
        *args: Any,
        progress_bar: bool = True,
        init_state: PSVIState | None = None,
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
            ``params`` (constrained), the final ``state`` (a :class:`PSVIState`, with
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
            jitted_body = jax.jit(body_fn)
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
            losses = jnp.stack(losses)
        else:
            state, losses = jax.jit(lambda s: lax.scan(body_fn, s, None, length=num_steps))(state)
        self._check_rejection_streak(state)
        rejected = int(state.num_rejected)
        if rejected:
            warnings.warn(
                f"ProximalScoreVI rejected {rejected} update(s) with non-finite scores, "
                "objective or parameters (or a trust-region step that could not be made "
                "small enough); the parameters were kept as they were. Likely causes: a "
                "learning rate too large, a model returning -inf, or badly scaled data.",
                RuntimeWarning,
                stacklevel=2,
            )
        return SVIRunResult(self.get_params(state), state, losses)

    def _density(self, args: tuple, kwargs: dict):
        """The guide's density: built once for an autoguide; for a user-written guide,
        with this call's arguments (the guide is run with them)."""
        if isinstance(self.guide, AutoGuide) and self.density is not None:
            return self.density
        return guide_density(self.guide, self.score_method, self.num_kl_draws, self.model, args, kwargs)

    def _particles_and_scores(
        self, density, unconstrained, key_particles, key_batch, args, kwargs
    ) -> tuple[jax.Array, ModelScores]:
        """``S`` particles from the guide's ``density`` (constants), and their
        :class:`ModelScores` from one pass (or one per particle) sharing the mini-batch of
        ``key_batch``; ``unconstrained`` holds all params (guide and model)."""
        params = self.constrain_fn(unconstrained)
        particles = lax.stop_gradient(density.sample(params, key_particles, self.num_particles))
        local_plates = density.local_plates
        plates = subsampled_plates(self.model, args, kwargs) if local_plates else {}
        indices = draw_plate_indices(plates, key_batch) if plates else None
        if not self._model_param_names:
            score_fn = make_score_fn(
                self.model, density.unpack, args, kwargs, local_plates, self.vectorize_particles
            )
            log_joints, scores = score_fn(particles, key_batch, indices)
            param_grads = {}
        else:
            model_params = {name: unconstrained[name] for name in self._model_param_names}
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
        return particles, ModelScores(log_joints, scores, param_grads, weights, active_dim)

    def _check_rejection_streak(self, state: PSVIState) -> None:
        check_rejection_streak(
            type(self).__name__, int(state.consecutive_rejected), self.max_consecutive_rejections,
            "updates",
        )  # fmt: skip

    def _check_initialized(self) -> None:
        if self.constrain_fn is None:
            raise RuntimeError("Call ProximalScoreVI.init(rng_key, *args) (or run) first.")


def save_state(path: str | os.PathLike, state: Any) -> None:
    """Write an engine state (:class:`PSVIState` or a baseline's) to ``path``.

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
