"""A reference for an exact inner solve of conjugate user guides (issue 19 item 1, issue 24).

The Gamma ``(a, b)`` guide of the precision target and the Beta ``(a, b)`` guide of the
coin (:func:`psvi.contrib.targets.conjugate_data`, N = 2,000) have scores in the
unconstrained coordinate that are linear in their args, which are their natural parameters
up to a shift: an update's proximal objective (the weighted Fisher term on the particles
plus ``weight * KL(q_t || q)``) is convex in them and damped Newton steps with a line
search solve it to round-off, whatever the optimizer. This module runs that update outside
the engines, in NumPy/SciPy (float64): ``S`` particles from ``q_t``, the model's
mini-batch scores (the plate's ``N/B`` scaling, batches reshuffled every epoch), covariance
weighting (``q_t``'s variance of the unconstrained value), the trust region's budget
``0.02 N/B`` nats (the engine's for such guides), a step that exceeds it halved in
``(log a, log b)``, and the engine's ``i^5`` average of ``(log a, log b)``
(:func:`psvi.schedules.iterate_average_rate`). Start ``a = b = 5`` (the benchmark's far
start). Reported at each checkpoint: the averaged and the last iterate's mean error of the
unconstrained value in exact posterior sds and their sd ratios.

``--growths``: the weight ``max(weight, growth t)`` at update ``t`` (the engines' default
with a subsampled plate: ``--weights 10 --growths 1``,
:data:`psvi.objective.LINEAR_SOLVE_PROX_WEIGHT_GROWTH`);
``--ladder``: the trust region solved as the engines solve it (the smallest weight ``weight
2^k`` within the budget) in place of the pull-back.

    python -m benchmarks.conjugate_exact_solve [--weights 100 400] [--batches 100 400 2000]
        [--growths 0 1] [--ladder] [--seeds 3] [--updates 3000] [--quick]

writes ``benchmarks/results/conjugate_exact_solve.json`` (``--out``); docs/minibatch.md,
"An exact inner solve, measured".
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import betaln, digamma, gammaln, polygamma

from benchmarks.common import save
from psvi.contrib.targets import conjugate_data, conjugate_posterior, conjugate_unconstrained_moments
from psvi.objective import LINEAR_SOLVE_WEIGHTS
from psvi.schedules import growing_prox_weight, iterate_average_rate

CHECKPOINTS = (20, 50, 100, 200, 300, 500, 1000, 2000, 3000)
NEWTON_ITERATIONS = 60
START = (5.0, 5.0)


def _trigamma(value: np.ndarray | float) -> np.ndarray:
    return polygamma(1, value)


@dataclass(frozen=True)
class ConjugateFamily:
    """A guide family with linear scores ``a phi_1(u) + b phi_2(u)`` in the unconstrained
    coordinate ``u``, and the target's model score in the same form with mini-batch args."""

    features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    batch_args: Callable[[np.ndarray, int, int], tuple[float, float]]
    kl: Callable[..., float]
    kl_gradient: Callable[..., np.ndarray]
    kl_hessian: Callable[[float, float], np.ndarray]
    draw: Callable[[np.random.Generator, float, float, int], np.ndarray]
    variance: Callable[[float, float], float]


def _gamma_batch_args(batch: np.ndarray, num: int, size: int) -> tuple[float, float]:
    # tau ~ Gamma(2, 2), x_n ~ N(0, 1 / tau): score in log tau is
    # (2 + N/2) - e^u (2 + (N/B) sum_b x^2 / 2).
    return 2.0 + num / 2.0, 2.0 + (num / size) * float(np.sum(batch**2)) / 2.0


def _beta_batch_args(batch: np.ndarray, num: int, size: int) -> tuple[float, float]:
    # p ~ Beta(2, 2), y_n ~ Bernoulli(p): score in logit p is a_B (1 - p) - b_B p.
    heads = (num / size) * float(np.sum(batch))
    return 2.0 + heads, 2.0 + num - heads


def _gamma_kl(a_t: float, b_t: float, a: float, b: float) -> float:
    return (
        (a_t - a) * digamma(a_t) - gammaln(a_t) + gammaln(a)
        + a * (np.log(b_t) - np.log(b)) + a_t * (b - b_t) / b_t
    )  # fmt: skip


def _beta_kl(a_t: float, b_t: float, a: float, b: float) -> float:
    return (
        betaln(a, b) - betaln(a_t, b_t) + (a_t - a) * digamma(a_t) + (b_t - b) * digamma(b_t)
        + (a - a_t + b - b_t) * digamma(a_t + b_t)
    )  # fmt: skip


def _logit_draws(rng: np.random.Generator, a: float, b: float, num: int) -> np.ndarray:
    p = np.clip(rng.beta(a, b, num), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


FAMILIES = {
    "precision": ConjugateFamily(
        features=lambda u: (np.ones_like(u), -np.exp(u)),
        batch_args=_gamma_batch_args,
        kl=_gamma_kl,
        kl_gradient=lambda a_t, b_t, a, b: np.array(
            [digamma(a) - np.log(b) - digamma(a_t) + np.log(b_t), a_t / b_t - a / b]
        ),
        kl_hessian=lambda a, b: np.array([[_trigamma(a), -1 / b], [-1 / b, a / b**2]]),
        draw=lambda rng, a, b, num: np.log(rng.gamma(a, 1 / b, num)),
        variance=lambda a, b: float(_trigamma(a)),
    ),
    "coin": ConjugateFamily(
        features=lambda u: (1 / (1 + np.exp(u)), -1 / (1 + np.exp(-u))),
        batch_args=_beta_batch_args,
        kl=_beta_kl,
        kl_gradient=lambda a_t, b_t, a, b: np.array(
            [
                digamma(a) - digamma(a + b) - digamma(a_t) + digamma(a_t + b_t),
                digamma(b) - digamma(a + b) - digamma(b_t) + digamma(a_t + b_t),
            ]
        ),  # fmt: skip
        kl_hessian=lambda a, b: np.array(
            [
                [_trigamma(a) - _trigamma(a + b), -_trigamma(a + b)],
                [-_trigamma(a + b), _trigamma(b) - _trigamma(a + b)],
            ]
        ),  # fmt: skip
        draw=_logit_draws,
        variance=lambda a, b: float(_trigamma(a) + _trigamma(b)),
    ),
}


def proximal_solve(
    family: ConjugateFamily,
    args_t: tuple[float, float],
    particles: np.ndarray,
    batch_args: tuple[float, float],
    weight: float,
) -> tuple[float, float]:
    """``argmin_{a, b > 0} w mean_s r_s^2 + weight KL(q_t || q)``, ``r_s`` the residual of
    the guide's score against the batch's at particle ``s`` and ``w`` q_t's variance: Newton
    in ``(log a, log b)`` with a backtracking line search (gradient steps where the Hessian
    there is not positive definite)."""
    phi_1, phi_2 = family.features(particles)
    (a_t, b_t), (a_batch, b_batch) = args_t, batch_args
    w = family.variance(a_t, b_t)

    def objective(z: np.ndarray) -> float:
        a, b = np.exp(z)
        residual = (a - a_batch) * phi_1 + (b - b_batch) * phi_2
        value = w * np.mean(residual**2) + weight * family.kl(a_t, b_t, a, b)
        return float(value) if np.isfinite(value) else np.inf

    z = np.log([a_t, b_t])
    value = objective(z)
    for _ in range(NEWTON_ITERATIONS):
        a, b = np.exp(z)
        residual = (a - a_batch) * phi_1 + (b - b_batch) * phi_2
        gradient = 2 * w * np.array([np.mean(residual * phi_1), np.mean(residual * phi_2)])
        gradient = gradient + weight * family.kl_gradient(a_t, b_t, a, b)
        products = np.array([[np.mean(phi_1 * phi_1), np.mean(phi_1 * phi_2)],
                             [np.mean(phi_1 * phi_2), np.mean(phi_2 * phi_2)]])  # fmt: skip
        hessian = 2 * w * products + weight * family.kl_hessian(a, b)
        jacobian = np.diag([a, b])  # d(a, b) / d(log a, log b)
        gradient_z = jacobian @ gradient
        hessian_z = jacobian @ hessian @ jacobian + np.diag(gradient_z)
        try:
            step = -np.linalg.solve(hessian_z, gradient_z)
        except np.linalg.LinAlgError:
            step = -gradient_z
        if not np.all(np.isfinite(step)) or gradient_z @ step >= 0:
            step = -gradient_z
        size = min(1.0, 2.0 / max(float(np.abs(step).max()), 1e-12))  # at most e^2 per iteration
        while objective(z + size * step) > value + 1e-4 * size * (gradient_z @ step) and size > 1e-12:
            size /= 2
        z = z + size * step
        new_value = objective(z)
        converged = abs(value - new_value) <= 1e-13 * max(1.0, abs(value))
        value = new_value
        if converged:
            break
    a, b = np.exp(z)
    return float(a), float(b)


def fit(
    target: str,
    weight: float,
    batch: int,
    seed: int,
    updates: int,
    particles: int = 4,
    growth: float = 0.0,
    ladder: bool = False,
) -> list[dict]:
    """One fit; a row per checkpoint (:data:`CHECKPOINTS` up to ``updates``). The weight at
    update ``t = 0, 1, ...`` is ``max(weight, growth t)``
    (:func:`psvi.schedules.growing_prox_weight`); with ``ladder`` the trust region as the
    engines solve it (the smallest ``weight 2^k`` whose solution is within the budget),
    else a step past it halved in ``(log a, log b)``."""
    family, data = FAMILIES[target], conjugate_data()[0 if target == "precision" else 1].astype(np.float64)
    num = len(data)
    exact_mean, exact_sd = conjugate_unconstrained_moments(target, *conjugate_posterior(target, data))
    budget = 0.02 * max(num / batch, 1.0)
    rng = np.random.default_rng(seed)
    args, average, averaged = START, None, 0
    order, position, rows = rng.permutation(num), 0, []
    for update in range(1, updates + 1):
        if position + batch > num:
            order, position = rng.permutation(num), 0
        batch_args = family.batch_args(data[order[position : position + batch]], num, batch)
        position += batch
        draws, weight_t = family.draw(rng, *args, particles), growing_prox_weight(weight, growth, update - 1)
        if ladder:
            for factor in LINEAR_SOLVE_WEIGHTS:
                solved = proximal_solve(family, args, draws, batch_args, weight_t * factor)
                if family.kl(*args, *solved) <= budget:
                    break
            z = np.log(solved)
        else:
            solved = proximal_solve(family, args, draws, batch_args, weight_t)
            start, end, fraction = np.log(args), np.log(solved), 1.0
            while family.kl(*args, *np.exp(start + fraction * (end - start))) > budget and fraction > 1e-6:
                fraction /= 2
            z = start + fraction * (end - start)
        args = tuple(float(v) for v in np.exp(z))
        average = z if average is None else average + iterate_average_rate(averaged) * (z - average)
        averaged += 1
        if update in CHECKPOINTS:
            row = {"target": target, "weight": weight, "batch": batch, "seed": seed, "updates": update}
            row.update({"growth": growth, "ladder": ladder} if growth or ladder else {})
            for label, values in (("average", np.exp(average)), ("last", np.asarray(args))):
                mean, sd = conjugate_unconstrained_moments(target, *values)
                row[f"{label} mean error (sd)"] = float((mean - exact_mean) / exact_sd)
                row[f"{label} sd ratio"] = float(sd / exact_sd)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--weights", type=float, nargs="+", default=[100.0, 200.0, 400.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[100])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument(
        "--growths", type=float, nargs="+", default=[0.0], help="the weight max(weight, growth t) at update t"
    )
    parser.add_argument("--ladder", action="store_true", help="the engines' trust region (a weight ladder)")
    parser.add_argument("--quick", action="store_true", help="one seed, 100 updates, the weight 100")
    parser.add_argument("--out", default="conjugate_exact_solve")
    args = parser.parse_args()
    if args.quick:
        args.weights, args.seeds, args.updates, args.out = [100.0], 1, 100, "conjugate_exact_solve_quick"
    rows = []
    with warnings.catch_warnings():  # the line search's overflowing trial points read as +inf
        warnings.simplefilter("ignore", RuntimeWarning)
        for target, weight, growth, batch, seed in itertools.product(
            args.targets, args.weights, args.growths, args.batches, range(args.seeds)
        ):
            fitted = fit(target, weight, batch, seed, args.updates, growth=growth, ladder=args.ladder)
            rows.extend(fitted)
            last = fitted[-1]
            print(
                f"{target:9s} B={batch:5d} weight={weight:6g} growth={growth:g} seed={seed}: after "
                f"{last['updates']} average "
                f"{last['average mean error (sd)']:+.2f} sd / {last['average sd ratio']:.2f}, last iterate "
                f"{last['last mean error (sd)']:+.2f} / {last['last sd ratio']:.2f}",
                flush=True,
            )
    trust_region = "a weight ladder" if args.ladder else "a pull-back in (log a, log b)"
    save(args.out, {"start": START, "budget": f"0.02 N/B nats, {trust_region}", "rows": rows})


if __name__ == "__main__":
    main()
