"""GSM and BaM: closed-form score-based baselines (``../shared/docs/BASELINES.md``).

Both fit an ``AutoMultivariateNormal`` guide with closed-form updates (no
optimizer) from ``num_particles`` particles and their model scores, computed by the
same machinery as :class:`~numpyro_psvi.ProximalScoreVI` (plates, constraints and
mini-batches behave the same). An update whose covariance is not positive definite,
or whose scores are not finite, is rejected: the parameters are kept and
``BaselineState.num_rejected`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from jax import lax, random
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.svi import SVIRunResult

from numpyro_psvi.guides import guide_density
from numpyro_psvi.objective import weighted_fisher
from numpyro_psvi.scores import check_model, make_score_fn, model_param_names
from psvi.checks import check_rejection_streak


class BaselineState(NamedTuple):
    """State of :class:`GSM` and :class:`BaM`: constrained guide params and counters
    (as in :class:`~numpyro_psvi.PSVIState`; ``step`` counts updates, for schedules)."""

    params: dict
    rng_key: jax.Array
    num_score_calls: jax.Array
    num_rejected: jax.Array
    consecutive_rejected: jax.Array
    step: jax.Array


def gsm_step(loc, cov, particles, scores):
    """One batch GSM update (Modi et al. 2023): the new ``(loc, cov)``."""

    def one(u, g):
        eps = cov @ g + u - loc
        diff = loc - u
        gamma = g @ cov @ g + (diff @ g) ** 2
        rho = 0.5 * jnp.sqrt(1 + 4 * gamma) - 0.5
        dmu = (eps - diff * (g @ eps) / (1 + rho + diff @ g)) / (1 + rho)
        new_diff = loc + dmu - u
        return dmu, jnp.outer(diff, diff) - jnp.outer(new_diff, new_diff)

    dmus, dcovs = jax.vmap(one)(particles, scores)
    return loc + dmus.mean(0), cov + dcovs.mean(0)


def bam_step(loc, cov, particles, scores, learning_rate):
    """One BaM update (Cai et al. 2024) with learning rate ``l``: the new ``(loc, cov)``.

    ``S U S + S = V`` is solved as ``S = 2 L (I + M^{1/2})^{-1} L'`` with ``V = L L'`` and
    ``M = I + 4 L' U L`` (symmetric), which equals BASELINES.md's
    ``2 V (I + (I + 4 U V)^{1/2})^{-1}`` and is symmetric positive definite by construction.
    """
    num = particles.shape[0]
    zbar, gbar = particles.mean(0), scores.mean(0)
    c = (particles - zbar).T @ (particles - zbar) / num
    gamma = (scores - gbar).T @ (scores - gbar) / num
    frac = learning_rate / (1 + learning_rate)
    u = learning_rate * gamma + frac * jnp.outer(gbar, gbar)
    v = cov + learning_rate * c + frac * jnp.outer(loc - zbar, loc - zbar)
    v_tril = jnp.linalg.cholesky(v)
    evals, evecs = jnp.linalg.eigh(jnp.eye(len(loc)) + 4 * v_tril.T @ u @ v_tril)
    inv_term = (evecs / (1 + jnp.sqrt(jnp.clip(evals, 0.0)))) @ evecs.T
    new_cov = 2 * v_tril @ inv_term @ v_tril.T
    new_cov = 0.5 * (new_cov + new_cov.T)
    new_loc = loc / (1 + learning_rate) + frac * (new_cov @ gbar + zbar)
    return new_loc, new_cov


class _GaussianBaseline:
    """Shared ``init / update / run / get_params`` of the closed-form baselines."""

    def __init__(
        self,
        model: Callable,
        guide: Any,
        *,
        num_particles: int,
        max_consecutive_rejections: int | None = 20,
        **static_kwargs: Any,
    ):
        if not isinstance(guide, AutoMultivariateNormal):
            raise TypeError(
                f"{type(self).__name__} fits a full-covariance Gaussian: pass an "
                f"AutoMultivariateNormal guide, got {type(guide).__name__}."
            )
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}.")
        self.model = model
        self.guide = guide
        self.num_particles = int(num_particles)
        self.max_consecutive_rejections = max_consecutive_rejections
        self.static_kwargs = static_kwargs
        # SVI collects the guide's params (the optimizer is never stepped).
        self._svi = SVI(model, guide, numpyro.optim.SGD(0.0), Trace_ELBO(), **static_kwargs)
        self.density = None

    def _closed_form(self, loc, cov, particles, scores, step):
        raise NotImplementedError

    def init(self, rng_key: jax.Array, *args: Any, init_params: dict | None = None, **kwargs: Any):
        """Return the initial :class:`BaselineState` (sets the guide up)."""
        local = check_model(self.model, random.split(rng_key, 3)[1], args, {**kwargs, **self.static_kwargs})
        if local:
            name, plate = next(iter(local.items()))
            raise NotImplementedError(
                f"Latent site {name!r} is local to the subsampled plate {plate!r}; "
                f"{type(self).__name__} fits one full-covariance Gaussian over all latents "
                "and cannot subsample them. Use ProximalScoreVI with AutoNormal, or the "
                "full plate (subsample_size=None)."
            )
        params = model_param_names(self.model, args, {**kwargs, **self.static_kwargs})
        if params:
            raise NotImplementedError(
                f"{type(self).__name__} fits latent sites only; the model has learnable "
                f"params {list(params)}. Use ProximalScoreVI (which learns them jointly) or "
                "fix them with numpyro.handlers.substitute."
            )
        svi_state = self._svi.init(rng_key, *args, init_params=init_params, **kwargs)
        self.density = guide_density(self.guide)
        zero = jnp.zeros((), jnp.int32)
        params = self._svi.get_params(svi_state)
        return BaselineState(params, svi_state.rng_key, zero, zero, zero, zero)

    def get_params(self, state: BaselineState) -> dict:
        """Constrained guide params, as ``SVI.get_params`` returns them."""
        return state.params

    def update(self, state: BaselineState, *args: Any, **kwargs: Any):
        """One closed-form update from ``num_particles`` score calls (pure, jittable).

        Returns the next state and the covariance-weighted Fisher divergence of the
        current guide on this update's particles (NaN when the update was rejected).
        """
        if self.density is None:
            raise RuntimeError(f"Call {type(self).__name__}.init(rng_key, *args) (or run) first.")
        kwargs = {**kwargs, **self.static_kwargs}
        prefix = self.guide.prefix
        rng_key, key_particles, key_batch = random.split(state.rng_key, 3)
        params = state.params
        particles = self.density.sample(params, key_particles, self.num_particles)
        score_fn = make_score_fn(self.model, self.density.unpack, args, kwargs)
        log_joints, scores = score_fn(particles, key_batch)
        loss = weighted_fisher(self.density, params, params, particles, scores, "covariance")
        loc, tril = params[f"{prefix}_loc"], params[f"{prefix}_scale_tril"]
        new_loc, new_cov = self._closed_form(loc, tril @ tril.T, particles, scores, state.step)
        new_tril = jnp.linalg.cholesky(new_cov)  # NaN when not positive definite
        accept = jnp.all(jnp.isfinite(new_tril)) & jnp.all(jnp.isfinite(new_loc))
        accept &= jnp.all(jnp.isfinite(log_joints)) & jnp.all(jnp.isfinite(scores))
        new_params = {
            **params,
            f"{prefix}_loc": jnp.where(accept, new_loc, loc),
            f"{prefix}_scale_tril": jnp.where(accept, new_tril, tril),
        }
        new_state = BaselineState(
            new_params,
            rng_key,
            state.num_score_calls + self.num_particles,
            state.num_rejected + (~accept).astype(jnp.int32),
            jnp.where(accept, 0, state.consecutive_rejected + 1),
            state.step + 1,
        )
        return new_state, jnp.where(accept, loss, jnp.nan)

    def run(self, rng_key: jax.Array, num_steps: int, *args: Any, init_state=None, **kwargs: Any):
        """``num_steps`` updates in one ``lax.scan``; returns NumPyro's ``SVIRunResult``.

        Raises ``RuntimeError`` when the last ``max_consecutive_rejections`` updates
        were all rejected.
        """
        state = self.init(rng_key, *args, **kwargs) if init_state is None else init_state
        state, losses = jax.jit(
            lambda s: lax.scan(lambda s, _: self.update(s, *args, **kwargs), s, None, length=num_steps)
        )(state)
        check_rejection_streak(
            type(self).__name__, int(state.consecutive_rejected), self.max_consecutive_rejections,
            "updates",
        )  # fmt: skip
        return SVIRunResult(self.get_params(state), state, losses)


class GSM(_GaussianBaseline):
    """Gaussian score matching VI (Modi et al., NeurIPS 2023), ``num_particles`` per update."""

    def __init__(self, model: Callable, guide: Any, *, num_particles: int = 2, **static_kwargs):
        super().__init__(model, guide, num_particles=num_particles, **static_kwargs)

    def _closed_form(self, loc, cov, particles, scores, step):
        return gsm_step(loc, cov, particles, scores)


class BaM(_GaussianBaseline):
    """Batch and match VI (Cai et al., ICML 2024).

    Parameters
    ----------
    learning_rate : float or callable
        A constant ``l`` or a schedule ``l(t)`` of the update count ``t = 0, 1, ...``
        (see :func:`bam_schedule`).
    """

    def __init__(
        self,
        model: Callable,
        guide: Any,
        *,
        num_particles: int = 2,
        learning_rate: float | Callable[[jax.Array], jax.Array] = 1.0,
        **static_kwargs,
    ):
        if num_particles < 2:
            raise ValueError("BaM needs num_particles >= 2 (batch covariances).")
        super().__init__(model, guide, num_particles=num_particles, **static_kwargs)
        self.learning_rate = learning_rate

    def _closed_form(self, loc, cov, particles, scores, step):
        rate = self.learning_rate(step) if callable(self.learning_rate) else self.learning_rate
        return bam_step(loc, cov, particles, scores, rate)
