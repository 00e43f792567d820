"""GSM and BaM: closed-form score-based baselines (docs/baselines.md).

Both fit an ``AutoMultivariateNormal`` guide with closed-form updates (no
optimizer) from ``num_particles`` particles and their model scores, on the same
:class:`~numpyro_psvi.engine.ScoreEngine` as :class:`~numpyro_psvi.ProximalScoreVI`
(set-up checks, plates, constraints, mini-batches, counters and ``run`` behave the
same). An update whose covariance is not positive definite, or whose scores are not
finite, is rejected: the parameters are kept and ``EngineState.num_rejected`` counts
it. :attr:`EngineState.optim_state` holds the constrained guide params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import random
from jax.sharding import Mesh

from numpyro_psvi.engine import EngineState, ScoreEngine
from numpyro_psvi.objective import negative_elbo
from psvi.checks import baseline_local_latent_message


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
    ``M = I + 4 L' U L`` (symmetric), which equals docs/baselines.md's
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


class _GaussianBaseline(ScoreEngine):
    """The shared ``update`` of the closed-form baselines."""

    def __init__(
        self,
        model: Callable,
        guide: Any,
        *,
        num_particles: int,
        vectorize_particles: bool = True,
        max_consecutive_rejections: int | None = 20,
        data_parallel: bool | Mesh | None = None,
        reshuffle: bool = True,
        **static_kwargs: Any,
    ):
        super().__init__(
            model, guide, None, num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            max_consecutive_rejections=max_consecutive_rejections, data_parallel=data_parallel,
            reshuffle=reshuffle, **static_kwargs,
        )  # fmt: skip
        if not self.family.full_covariance:
            raise TypeError(
                f"{type(self).__name__} fits a full-covariance Gaussian: pass an "
                f"AutoMultivariateNormal guide, got {type(guide).__name__}."
            )

    def _closed_form(self, loc, cov, particles, scores, step):
        raise NotImplementedError

    def _check_local_latents(self, local: dict[str, str]) -> None:
        if local:
            name, plate = next(iter(local.items()))
            raise NotImplementedError(baseline_local_latent_message(type(self).__name__, name, plate))

    def _check_model_params(self) -> None:
        if self._model_param_names:
            raise NotImplementedError(
                f"{type(self).__name__} fits latent sites only; the model has learnable "
                f"params {list(self._model_param_names)}. Use ProximalScoreVI (which learns "
                "them jointly) or fix them with numpyro.handlers.substitute."
            )

    def _initial_optim_state(self, optim_state: Any) -> dict:
        return self.constrain_fn(self.optim.get_params(optim_state))

    def get_params(self, state: EngineState) -> dict:
        """Constrained guide params, as ``SVI.get_params`` returns them."""
        return state.optim_state

    def update(self, state: EngineState, *args: Any, **kwargs: Any) -> tuple[EngineState, jax.Array]:
        """One closed-form update from ``num_particles`` score calls (pure, jittable).

        Returns the next state and the ``-ELBO`` estimate of the current guide from this
        update's particles, as ``SVI``'s loss (NaN when the update was rejected).
        """
        kwargs, density = self._prepare(args, kwargs)
        prefix = self.guide.prefix
        rng_key, key_particles, key_batch = random.split(state.rng_key, 3)
        params = state.optim_state
        particles, scored = self.score_particles(
            density, params, {}, key_particles, key_batch, args, kwargs, indices=self.batch_indices(state)
        )
        scores = scored.scores
        loss = negative_elbo(density, params, particles, scored.log_joints)
        loc, tril = params[f"{prefix}_loc"], params[f"{prefix}_scale_tril"]
        step = state.num_score_calls // self.num_particles
        new_loc, new_cov = self._closed_form(loc, tril @ tril.T, particles, scores, step)
        new_tril = jnp.linalg.cholesky(new_cov)  # NaN when not positive definite
        accept = jnp.all(jnp.isfinite(new_tril)) & jnp.all(jnp.isfinite(new_loc))
        accept &= jnp.all(jnp.isfinite(scored.log_joints)) & jnp.all(jnp.isfinite(scores))
        candidate = {**params, f"{prefix}_loc": new_loc, f"{prefix}_scale_tril": new_tril}
        return self.record(state, candidate, accept, rng_key), jnp.where(accept, loss, jnp.nan)


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
