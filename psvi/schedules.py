"""Step-size and averaging schedules that need neither backend: each works on a Python
number, a JAX array (a traced update count) and a torch tensor alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


def bam_schedule(kind: str, l0: float = 1.0, *, batch: int = 1, dim: int = 1) -> Callable[[Any], Any]:
    """BaM's learning-rate schedules of the update count ``t = 0, 1, ...``:
    ``"constant"`` (``l0``), ``"bd"`` (``B D / (t + 1)``), ``"inverse"`` (``l0 / (t + 1)``),
    ``"inverse_sqrt"`` (``l0 / sqrt(t + 1)``)."""
    schedules = {
        "constant": lambda t: l0 + 0.0 * t,
        "bd": lambda t: batch * dim / (t + 1.0),
        "inverse": lambda t: l0 / (t + 1.0),
        "inverse_sqrt": lambda t: l0 / (t + 1.0) ** 0.5,
    }
    if kind not in schedules:
        raise ValueError(f"kind must be one of {sorted(schedules)}, got {kind!r}.")
    return schedules[kind]


def growing_prox_weight(prox_weight: float, growth: float, update: Any) -> Any:
    """The proximal weight at update ``update = 0, 1, ...``: ``max(prox_weight, growth *
    update)`` (``prox_weight`` with ``growth = 0``), for a Python number, a JAX array or a
    torch tensor."""
    grown = growth * update
    return 0.5 * (prox_weight + grown + abs(grown - prox_weight))  # the max, for any of the three


def iterate_average_rate(num_averaged: Any) -> Any:
    """Weight of the next iterate in a running average of ``num_averaged`` iterates, such
    that iterate ``i`` (from 1) carries a weight in proportion to ``i (i+1) ... (i+4)``,
    about ``i^5``: ``6 / (n + 6)`` (Polyak-Ruppert
    averaging that forgets the start: the first half of a run keeps 1.6% of the weight,
    so that a start that takes half the run to reach the posterior, as with Adam(1e-3),
    barely enters the average; docs/minibatch.md section 12)."""
    return 6.0 / (num_averaged + 6.0)


AVERAGE_RESTART_MARGIN = 4.0
"""Standard errors by which an iterate's ``-ELBO`` estimate must lie below its window's
for :func:`restarts_average` (a margin of 2, probed against the last estimate, restarted
on chance falls every few dozen updates: non-centered eight schools in the reference
band 0.36 of the time; docs/gaussian_study.md, "The closed-form step's damping")."""
SETTLED_AFTER = 10
"""Updates without a restart after which :func:`progress_budget_scale` calls a fit settled."""
PROGRESS_BUDGET_SCALE = 2.5
"""The closed-form step's least KL budget multiplier while its fit progresses (0.05 nats per
dimension at the default ``trust_region``; docs/gaussian_study.md, "Averaged iterates")."""
FAR_PHASE_GROWTH = 8.0
"""The closed-form step's trust-region growth (:func:`psvi.objective.grow_trust_region`)
from which :func:`far_from_posterior` holds: three doublings, each after a step the budget
cut whose ``-ELBO`` estimate then fell by more than two standard errors, and no rise since
(docs/gaussian_study.md, "Averaged iterates for the closed-form step")."""


class LossWindow(NamedTuple):
    """The ``-ELBO`` estimates of the iterates in a running average that restarts
    (:func:`restarts_average`): JAX arrays in ``numpyro_psvi``, torch tensors in
    ``pyro_psvi``.

    Attributes
    ----------
    mean
        The estimates' mean, weighted as :func:`iterate_average_rate` weights the
        iterates (``inf`` before the first).
    variance
        The variance of that mean, from the estimates' standard errors.
    """

    mean: Any
    variance: Any

    def advanced(self, loss: Any, error: Any, rate: Any, where: Callable) -> LossWindow:
        """The window with the estimate ``loss`` (standard error ``error``) of the iterate
        averaged in at ``rate`` (1 restarts it); ``where`` is ``jnp.where`` or ``torch.where``."""
        kept = where(rate >= 1, loss, self.mean)  # not the empty window's inf: inf - inf is NaN
        return LossWindow(kept + rate * (loss - kept), (1 - rate) ** 2 * self.variance + rate**2 * error**2)


def restarts_average(window: LossWindow, loss: Any, error: Any) -> Any:
    """Whether a running average of iterates restarts at the iterate whose ``-ELBO``
    estimate is ``loss`` (standard error ``error``): where that lies more than
    :data:`AVERAGE_RESTART_MARGIN` standard errors of the difference below the window's
    mean, the fit still progresses and the average would lag behind it.

    With exact scores on a Gaussian target the estimates' errors vanish as the fit
    arrives, so the average follows the iterate there; where the closed-form steps
    wander about a non-Gaussian posterior (eight schools) the estimates level off, and the
    average accumulates. The window's own error is that of its weighted mean: one
    heavy-tailed estimate (a funnel's neck) raises it as much as the mean, so that the
    next iterate does not restart the average on it.
    """
    return loss < window.mean - AVERAGE_RESTART_MARGIN * (error**2 + window.variance) ** 0.5


def fit_progresses(updates_averaged: Any) -> Any:
    """Whether the closed-form step's fit still progresses: its average of iterates,
    ``updates_averaged`` long, restarted in the last :data:`SETTLED_AFTER` updates."""
    return updates_averaged <= SETTLED_AFTER


def progress_budget_scale(updates_averaged: Any, growth: Any) -> Any:
    """The closed-form step's KL budget multiplier with averaged iterates: the trust
    region's ``growth``, and at least :data:`PROGRESS_BUDGET_SCALE` while the fit
    progresses (:func:`fit_progresses`), so 1 once settled and not grown. Larger steps
    reach a Gaussian posterior sooner, but about a non-Gaussian one they wander further
    and the average of their iterates drifts (the
    centered eight schools' mean errors 0.39-0.47 sd with 2.5 throughout, 0.33-0.38 with
    the settled budget, 0.31-0.39 before either). The larger of the two, not their product:
    a grown budget times 2.5 left far starts with non-finite estimates (105 rejected
    updates of 600 from NumPyro's ``init_to_uniform`` on PosteriorDB's earnings, 5 with
    the larger)."""
    least = 1.0 + (PROGRESS_BUDGET_SCALE - 1.0) * fit_progresses(updates_averaged)
    return growth + (least - growth) * (growth < least)


def progress_prox_weight(updates_averaged: Any, prox_weight: Any, progress_weight: Any) -> Any:
    """The closed-form step's proximal weight with averaged iterates: ``progress_weight``
    while the fit progresses (:func:`fit_progresses`, as for :func:`progress_budget_scale`),
    ``prox_weight`` once settled. While the average restarts, the guide returned follows
    the last iterates, and a weight ``w``
    moves each ``2 / (2 + w)`` of the way to the step its particles fit: the weight 3
    throughout left the Gaussian study's D = 10 targets at up to 1.4x the score calls of
    BaM's undamped steps. Once settled, the weight damps the wander about a non-Gaussian
    posterior that the average then smooths (docs/gaussian_study.md, "A lighter weight
    while the fit progresses")."""
    return prox_weight + (progress_weight - prox_weight) * fit_progresses(updates_averaged)


def far_from_posterior(growth: Any) -> Any:
    """Whether the closed-form step's fit is still on its way from a far start: its trust
    region's ``growth`` is at least :data:`FAR_PHASE_GROWTH`. Its average of iterates
    then restarts at every update: far from the posterior the ``-ELBO`` estimates' errors
    are as large as their excess, so :func:`restarts_average` cannot tell the fall from a
    heavy-tailed estimate's noise, and a window that keeps them stops it from restarting
    for hundreds of updates after the fit has arrived."""
    return growth >= FAR_PHASE_GROWTH
