"""The proximal score-matching objective (ALGORITHM.md section 2).

For particles ``u_s ~ q_t`` with model scores ``g_s``::

    L_t(lam) = (1/S) sum_s r_s' W_t r_s + prox_weight * KL(q_t || q_lam),
    r_s = grad_u log q_lam(u_s) - g_s,

with ``W_t = Cov(q_t)`` (``weighting="covariance"``) or ``I``
(``weighting="identity"``); ``prox_weight`` is the paper's ``1/eta``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_psvi.guides import GuideDensity, Params

WEIGHTINGS = ("covariance", "identity")


def weighted_fisher(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: torch.Tensor,
    model_scores: torch.Tensor,
    weighting: str,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over particles of ``r' W_t r`` with ``r = grad log q_params - g``.

    Parameters
    ----------
    density : GuideDensity
    params, params_t : dict
        Constrained guide params being fitted, and those the particles came from
        (the latter define ``W_t``; pass them detached).
    particles, model_scores : torch.Tensor
        Shape ``(S, D)`` each.
    weighting : {"covariance", "identity"}
    weights : torch.Tensor, optional
        ``(D,)`` per-coordinate weights of a mini-batch of local latents
        (:class:`pyro_psvi.scores.ModelScores`): the sum becomes ``sum_d weights_d
        (...)_d``, unbiased for the full sum. Only for a diagonal ``W_t`` (AutoNormal).
    """
    residuals = density.score(params, particles) - model_scores
    if weights is not None:
        residuals = residuals * weights.sqrt()
    if weighting == "covariance":
        return density.cov_quad(params_t, residuals).mean()
    return residuals.pow(2).sum(-1).mean()


def proximal_objective(
    density: GuideDensity,
    params: Params,
    params_t: Params,
    particles: torch.Tensor,
    model_scores: torch.Tensor,
    *,
    prox_weight: float,
    weighting: str,
    weights: torch.Tensor | None = None,
    kl_seed: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_t(params)`` and its two terms (``fisher``, ``kl``); ``params_t`` detached.
    ``weights``: see :func:`weighted_fisher`; ``kl_seed``: see ``GuideDensity.kl``."""
    fisher = weighted_fisher(density, params, params_t, particles, model_scores, weighting, weights)
    kl = density.kl(params_t, params, kl_seed)
    return fisher + prox_weight * kl, {"fisher": fisher, "kl": kl}


def trust_region_fraction(
    kl_at: Callable[[float], torch.Tensor], max_kl: float, max_halvings: int, *, lazy: bool
) -> torch.Tensor:
    """Largest ``frac`` in ``{1, 1/2, ..., 2^-max_halvings}`` with ``kl_at(frac) <= max_kl``.

    ``frac`` is 0 (reject the step) when no fraction qualifies or the KL is not
    finite. With ``lazy=True`` the fractions are tried in turn, reading each KL on
    the host (cheap on a CPU, where most steps need one KL); with ``lazy=False`` all
    are evaluated and the choice is made on the device, with no host synchronisation.
    """
    fracs = [2.0**-i for i in range(max_halvings + 1)]
    if lazy:
        for frac in fracs:
            kl = kl_at(frac)
            if bool(torch.isfinite(kl) & (kl <= max_kl)):
                return torch.tensor(frac, dtype=kl.dtype)
        return torch.zeros((), dtype=kl.dtype)
    kls = torch.stack([kl_at(frac) for frac in fracs])
    ok = torch.isfinite(kls) & (kls <= max_kl)
    fracs = torch.tensor(fracs, dtype=kls.dtype, device=kls.device)
    return torch.where(ok, fracs, torch.zeros_like(fracs)).max()
