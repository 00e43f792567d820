"""The proximal score-matching objective (ALGORITHM.md section 2).

For particles ``u_s ~ q_t`` with model scores ``g_s``::

    L_t(lam) = (1/S) sum_s r_s' W_t r_s + prox_weight * KL(q_t || q_lam),
    r_s = grad_u log q_lam(u_s) - g_s,

with ``W_t = Cov(q_t)`` (``weighting="covariance"``) or ``I``
(``weighting="identity"``); ``prox_weight`` is the paper's ``1/eta``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from numpyro_psvi.guides import GuideDensity, Params

WEIGHTINGS = ("covariance", "identity")


def weighted_fisher(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: jax.Array,
    model_scores: jax.Array,
    weighting: str,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Mean over particles of ``r' W_t r`` with ``r = grad log q_params - g``.

    Parameters
    ----------
    density : GuideDensity
    params, params_t : dict
        Constrained guide params being fitted, and those the particles came from
        (the latter define ``W_t``; they are treated as constants).
    particles, model_scores : jax.Array
        Shape ``(S, D)`` each.
    weighting : {"covariance", "identity"}
    weights : jax.Array, optional
        ``(D,)`` per-coordinate weights of a mini-batch of local latents
        (:func:`numpyro_psvi.scores.coordinate_weights`): the sum becomes ``sum_d
        weights_d (...)_d``, unbiased for the full sum. Only for a diagonal ``W_t``
        (AutoNormal).
    """
    residuals = jax.vmap(density.score, (None, 0))(params, particles) - model_scores
    if weights is not None:
        residuals = residuals * jnp.sqrt(weights)
    if weighting == "covariance":
        quad = jax.vmap(density.cov_quad, (None, 0))(params_t, residuals)
    else:
        quad = jnp.sum(residuals**2, axis=-1)
    return jnp.mean(quad)


def proximal_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: jax.Array,
    model_scores: jax.Array,
    kl_key: jax.Array,
    *,
    prox_weight: float,
    weighting: str,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """``L_t(params)`` and its two terms (``fisher``, ``kl``) as auxiliary output;
    ``weights``: see :func:`weighted_fisher`."""
    params_t = jax.lax.stop_gradient(params_t)
    fisher = weighted_fisher(density, params, params_t, particles, model_scores, weighting, weights)
    kl = density.kl(params_t, params, kl_key)
    return fisher + prox_weight * kl, {"fisher": fisher, "kl": kl}


def lerp_tree(tree_from: Any, tree_to: Any, frac: jax.Array) -> Any:
    """Move floating leaves a fraction ``frac`` of the way; other leaves take ``tree_to``."""

    def lerp(a, b):
        if jnp.issubdtype(jnp.result_type(b), jnp.inexact):
            return a + frac * (b - a)
        return b

    return jax.tree.map(lerp, tree_from, tree_to)


def trust_region_fraction(kl_at: Any, max_kl: jax.Array | float, max_halvings: int) -> jax.Array:
    """Largest ``frac`` in ``{1, 1/2, ..., 2^-max_halvings}`` with ``kl_at(frac) <= max_kl``.

    ``frac`` is 0 when no fraction qualifies (or the KL is not finite), which rejects
    the step.
    """

    def too_far(kl):
        return (kl > max_kl) | ~jnp.isfinite(kl)

    def cond(carry):
        _, kl, n = carry
        return too_far(kl) & (n < max_halvings)

    def body(carry):
        frac, _, n = carry
        frac = frac / 2
        return frac, kl_at(frac), n + 1

    one = jnp.asarray(1.0)
    frac, kl, _ = jax.lax.while_loop(cond, body, (one, kl_at(one), 0))
    return jnp.where(too_far(kl), 0.0, frac)
