"""Does a fitted guide miss a mode? A search of the posterior outside the guide.

Score-based fits see the target only where the guide's particles land, so a guide that
settled on one mode of a multimodal posterior matches that mode's scores and reports a
small loss; PSIS k-hat does not see it either (the guide's own draws never visit the
other mode, so their importance weights look fine). :func:`search_modes` looks for such
mass directly: gradient ascent on ``log p`` from two kinds of start, half the guide's own
draws pushed ``overdispersion`` times further from their mean, half uniform in
``(-2, 2)`` in unconstrained space (as ``init_to_uniform`` starts MCMC), then each end point is
judged against the guide's draws: it is *uncovered* when ``log p`` there is at least the
median ``log p`` of the guide's draws (the posterior is as dense there as where the
guide puts its mass) and ``log q`` there is below the ``floor`` quantile of ``log q``
over the guide's draws (the guide puts almost nothing there).

The backends supply the guide's draws and densities and the full-data ``log p`` with its
gradient in the flat unconstrained space, as NumPy functions
(``numpyro_psvi.mode_coverage``, ``pyro_psvi.mode_coverage``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

LogDensityAndScore = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ModeCoverage(NamedTuple):
    """What :func:`search_modes` found.

    Attributes
    ----------
    num_searches : int
        Gradient ascents run.
    num_uncovered : int
        Those that ended where the posterior is dense and the guide is not.
    uncovered : np.ndarray
        Their end points, ``(num_uncovered, D)``, flat and unconstrained.
    log_p_typical, log_q_floor : float
        The thresholds: the median ``log p`` and the ``floor`` quantile of ``log q`` over
        the guide's own draws.
    floor : float
        That quantile.
    """

    num_searches: int
    num_uncovered: int
    uncovered: np.ndarray
    log_p_typical: float
    log_q_floor: float
    floor: float


def search_modes(
    draws: np.ndarray,
    log_q: Callable[[np.ndarray], np.ndarray],
    log_p_and_score: LogDensityAndScore,
    num_searches: int = 32,
    num_steps: int = 300,
    overdispersion: float = 3.0,
    step_size: float = 0.1,
    floor: float = 1e-3,
    seed: int = 0,
) -> ModeCoverage:
    """Search for posterior mass the guide misses (module docstring).

    Parameters
    ----------
    draws : np.ndarray
        The guide's draws ``(n, D)``, flat and unconstrained (``n >= num_searches``;
        1000 or more make the ``floor`` quantile meaningful).
    log_q : callable
        ``(m, D) -> (m,)``: the guide's log density.
    log_p_and_score : callable
        ``(m, D) -> ((m,), (m, D))``: the full-data log joint and its gradient.
    num_searches, num_steps : int
        Ascents, and Adam steps each.
    overdispersion : float
        How much further than the guide's draws the starts lie from their mean.
    step_size : float
        Adam's step, in units of the guide's per-coordinate sd.
    floor : float
        The quantile of the guide's ``log q`` below which a point counts as outside it.
    seed : int
        Seed of the uniform starts.
    """
    draws = np.asarray(draws, np.float64)
    if draws.ndim != 2 or len(draws) < num_searches:
        raise ValueError(
            f"Need at least num_searches={num_searches} draws of shape (n, D); got {draws.shape}."
        )
    center, scale = draws.mean(0), draws.std(0) + 1e-12
    num_wide = num_searches // 2
    uniform = np.random.default_rng(seed).uniform(-2.0, 2.0, (num_searches - num_wide, draws.shape[1]))
    u = np.concatenate([center + overdispersion * (draws[:num_wide] - center), uniform])
    first, second = np.zeros_like(u), np.zeros_like(u)
    for t in range(1, num_steps + 1):  # Adam ascent on log p, steps in the guide's sd units
        _, grad = log_p_and_score(u)
        grad = np.where(np.isfinite(grad), grad, 0.0) * scale
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad**2
        step = (first / (1 - 0.9**t)) / (np.sqrt(second / (1 - 0.999**t)) + 1e-8)
        u = u + step_size * scale * step
    ends_log_p, _ = log_p_and_score(u)
    draws_log_p, _ = log_p_and_score(draws)
    finite = np.isfinite(draws_log_p)
    log_p_typical = float(np.median(draws_log_p[finite])) if finite.any() else -np.inf
    log_q_floor = float(np.quantile(log_q(draws), floor))
    uncovered = (np.asarray(ends_log_p) >= log_p_typical) & (np.asarray(log_q(u)) < log_q_floor)
    return ModeCoverage(num_searches, int(uncovered.sum()), u[uncovered], log_p_typical, log_q_floor, floor)


def uncovered_message(report: ModeCoverage, guide_name: str) -> str:
    """The warning for a guide that misses posterior mass."""
    return (
        f"The fitted {guide_name} misses posterior mass: {report.num_uncovered} of "
        f"{report.num_searches} gradient ascents on log p from spread-out starts ended "
        f"where the posterior is as dense as at the guide's typical draws (log p >= "
        f"{report.log_p_typical:.4g}) but the guide's density is below its own "
        f"{100 * report.floor:.3g}% quantile (log q < {report.log_q_floor:.4g}); e.g. at unconstrained "
        f"{np.array2string(report.uncovered[0], precision=3, threshold=8)}. The posterior is "
        "likely multimodal (or has a funnel) and the guide sits on part of it: a score-based "
        "fit does not see modes its particles never visit. Fit several guides from "
        "different inits (init_loc_fn) and compare their ELBOs, use a mixture guide with "
        "components spread over the prior's range, or sample with MCMC (NUTS; NeuTra "
        "needs a flow that covers every mode). See docs/guides.md, 'Multimodal posteriors'."
    )
