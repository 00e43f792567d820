"""GSM and BaM: closed-form score-based baselines (docs/baselines.md).

Both fit an ``AutoMultivariateNormal`` guide with closed-form updates (no
optimizer) from ``num_particles`` particles and their model scores, computed by the
same machinery as :class:`~pyro_psvi.ProximalScoreVI` (plates, constraints and
mini-batches behave the same). The guide's params stay in Pyro's param store. An
update whose covariance is not positive definite, or whose scores are not finite,
is rejected: the parameters are kept and ``num_rejected`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from psvi.checks import baseline_local_latent_message
from pyro_psvi.engine import ScoreEngine
from pyro_psvi.objective import negative_elbo
from pyro_psvi.parallel import ScoreReducer


def gsm_step(
    loc: torch.Tensor, cov: torch.Tensor, particles: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch GSM update (Modi et al. 2023): the new ``(loc, cov)``."""
    eps = scores @ cov + particles - loc  # cov is symmetric
    diff = loc - particles
    diff_g = (diff * scores).sum(-1)
    gamma = ((scores @ cov) * scores).sum(-1) + diff_g**2
    rho = 0.5 * torch.sqrt(1 + 4 * gamma) - 0.5
    g_eps = (scores * eps).sum(-1)
    dmu = (eps - diff * (g_eps / (1 + rho + diff_g))[:, None]) / (1 + rho)[:, None]
    new_diff = loc + dmu - particles
    num = particles.shape[0]
    dcov = diff.T @ diff / num - new_diff.T @ new_diff / num
    return loc + dmu.mean(0), cov + dcov


def bam_step(
    loc: torch.Tensor,
    cov: torch.Tensor,
    particles: torch.Tensor,
    scores: torch.Tensor,
    learning_rate: float,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    u = learning_rate * gamma + frac * torch.outer(gbar, gbar)
    v = cov + learning_rate * c + frac * torch.outer(loc - zbar, loc - zbar)
    v_tril = torch.linalg.cholesky(v)
    eye = torch.eye(len(loc), dtype=loc.dtype, device=loc.device)
    evals, evecs = torch.linalg.eigh(eye + 4 * v_tril.T @ u @ v_tril)
    inv_term = (evecs / (1 + torch.sqrt(evals.clamp(min=0.0)))) @ evecs.T
    new_cov = 2 * v_tril @ inv_term @ v_tril.T
    new_cov = 0.5 * (new_cov + new_cov.T)
    new_loc = loc / (1 + learning_rate) + frac * (new_cov @ gbar + zbar)
    return new_loc, new_cov


class _GaussianBaseline(ScoreEngine):
    """Shared ``step`` of the closed-form baselines over an AutoMultivariateNormal guide."""

    def __init__(
        self,
        model: Callable,
        guide: Any,
        *,
        num_particles: int,
        vectorize_particles: bool = True,
        max_plate_nesting: int | None = None,
        max_consecutive_rejections: int | None = 20,
        data_parallel: bool | ScoreReducer | None = None,
        reshuffle: bool = True,
    ) -> None:
        super().__init__(
            model, guide, num_particles=num_particles, vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting,
            max_consecutive_rejections=max_consecutive_rejections, data_parallel=data_parallel,
            reshuffle=reshuffle,
        )  # fmt: skip
        if not self.family.full_covariance:
            raise TypeError(
                f"{type(self).__name__} fits a full-covariance Gaussian: pass an "
                f"AutoMultivariateNormal guide, got {type(guide).__name__}."
            )
        self.num_updates = 0

    def _closed_form(self, loc, cov, particles, scores):
        raise NotImplementedError

    def _check_local_latents(self, local: dict[str, str]) -> None:
        if local:
            name, plate = next(iter(local.items()))
            raise NotImplementedError(baseline_local_latent_message(type(self).__name__, name, plate))

    def _setup(self, args: tuple, kwargs: dict) -> None:
        super()._setup(args, kwargs)
        if self._model_param_names:
            raise NotImplementedError(
                f"{type(self).__name__} fits latent sites only; the model has learnable "
                f"params {list(self._model_param_names)}. Use ProximalScoreVI (which learns "
                "them jointly) or fix them with poutine.condition."
            )

    def _checkpoint_extra(self) -> dict:
        return {"num_updates": self.num_updates}

    def _load_checkpoint_extra(self, extra: dict) -> None:
        self.num_updates = extra["num_updates"]

    def update(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One closed-form update from ``num_particles`` score calls.

        Returns the ``-ELBO`` estimate of the current guide from this update's particles
        (as ``SVI``'s loss), a 0-dim tensor (no host sync); NaN when rejected.
        """
        self._prepare(args, kwargs)
        leaves = self._leaves()
        with torch.no_grad():
            stored = {name: leaf.detach().clone() for name, leaf in leaves.items()}
        num_updates = self.num_updates

        def restore() -> None:
            self.num_updates = num_updates

        with self._restored_on_interrupt(leaves, stored, restore):
            accept, loss = self._closed_form_update(leaves, args, kwargs)
            self.record(accept)
            self.num_updates += 1
        return torch.where(accept, loss, torch.full_like(loss, float("nan")))

    def _closed_form_update(
        self, leaves: dict[str, torch.Tensor], args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the particles and write the closed-form update into ``leaves`` (kept as
        they were when rejected); returns the accept flag and the loss."""
        loc_name, scale_name, tril_name = self.density.param_names
        with torch.no_grad():
            params = self._constrain({k: v.detach() for k, v in leaves.items()})
        particles, scored = self.score_particles(params, args, kwargs)
        log_joint, scores = scored.log_joints, scored.scores
        with torch.no_grad():
            loss = negative_elbo(self.density, params, particles, log_joint)
            tril = params[scale_name][:, None] * params[tril_name]
            new_loc, new_cov = self._closed_form(params[loc_name], tril @ tril.T, particles, scores)
            new_tril, info = torch.linalg.cholesky_ex(new_cov)
            accept = (info == 0) & torch.isfinite(new_tril).all() & torch.isfinite(new_loc).all()
            accept &= torch.isfinite(log_joint).all() & torch.isfinite(scores).all()
            if self.reducer is not None:  # every rank accepts or rejects the same step
                accept = self.reducer.agree(accept)
            # Back to Pyro's parameterization: L = diag(scale) @ unit lower triangular.
            scale = torch.diagonal(new_tril).clamp(min=torch.finfo(new_tril.dtype).tiny)
            new_params = {loc_name: new_loc, scale_name: scale, tril_name: new_tril / scale[:, None]}
            for name, leaf in leaves.items():
                candidate = self._transforms[name].inv(new_params[name])
                leaf.copy_(torch.where(accept, candidate, leaf))
        return accept, loss


class GSM(_GaussianBaseline):
    """Gaussian score matching VI (Modi et al., NeurIPS 2023), ``num_particles`` per step."""

    def __init__(self, model: Callable, guide: Any, *, num_particles: int = 2,
                 **options: Any) -> None:  # fmt: skip
        super().__init__(model, guide, num_particles=num_particles, **options)

    def _closed_form(self, loc, cov, particles, scores):
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
        learning_rate: float | Callable[[int], float] = 1.0,
        **options: Any,
    ) -> None:
        if num_particles < 2:
            raise ValueError("BaM needs num_particles >= 2 (batch covariances).")
        super().__init__(model, guide, num_particles=num_particles, **options)
        self.learning_rate = learning_rate

    def _closed_form(self, loc, cov, particles, scores):
        rate = self.learning_rate
        rate = rate(self.num_updates) if callable(rate) else rate
        return bam_step(loc, cov, particles, scores, float(rate))
