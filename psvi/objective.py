"""The proximal score-matching objective as a small record (backend-free).

Passed to ``ProximalScoreVI`` the way ``Trace_ELBO()`` is passed to ``SVI``; see
docs/algorithm.md for the method.
"""

from __future__ import annotations

from typing import NamedTuple

WEIGHTINGS = ("covariance", "identity")


class ProximalScoreMatching(NamedTuple):
    """``L_t(lam) = (1/S) sum_s r_s' W_t r_s + prox_weight * KL(q_t || q_lam)``.

    Attributes
    ----------
    prox_weight : float
        Weight ``1/eta`` of the proximal term.
    weighting : {"covariance", "identity"}
        ``W_t``: the covariance of ``q_t`` (scale-free, the default) or the identity.
    num_kl_draws : int
        Draws from ``q_t`` for the Monte Carlo KL of guides without a closed form
        (they cost no score calls).
    """

    prox_weight: float = 10.0
    weighting: str = "covariance"
    num_kl_draws: int = 256

    def checked(self) -> ProximalScoreMatching:
        """This record, after checking its fields (``ValueError`` naming the bad one)."""
        if not self.prox_weight >= 0:
            raise ValueError(f"prox_weight (1/eta) must be >= 0, got {self.prox_weight}.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")
        if int(self.num_kl_draws) < 1:
            raise ValueError(f"num_kl_draws must be a positive integer, got {self.num_kl_draws}.")
        return self._replace(prox_weight=float(self.prox_weight), num_kl_draws=int(self.num_kl_draws))


def resolve_objective(
    loss: object, prox_weight: float | None, weighting: str | None
) -> ProximalScoreMatching:
    """The engine's objective from its ``loss`` argument and the ``prox_weight`` /
    ``weighting`` shorthands (which may not be combined with a ``loss`` record)."""
    if loss is None:
        loss = ProximalScoreMatching()
        if prox_weight is not None:
            loss = loss._replace(prox_weight=prox_weight)
        if weighting is not None:
            loss = loss._replace(weighting=weighting)
    elif not isinstance(loss, ProximalScoreMatching):
        raise TypeError(
            f"ProximalScoreVI minimizes the proximal score-matching objective, not "
            f"{type(loss).__name__}: drop the loss argument, or pass "
            "psvi.ProximalScoreMatching(prox_weight=..., weighting=...)."
        )
    elif prox_weight is not None or weighting is not None:
        raise ValueError(
            "Pass prox_weight and weighting inside the loss record "
            "(ProximalScoreMatching(prox_weight=..., weighting=...)) or as keywords, not both."
        )
    return loss.checked()
