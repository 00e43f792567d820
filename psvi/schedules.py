"""Step-size schedules that need neither backend: each works on a Python number, a JAX
array (a traced update count) and a torch tensor alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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


def iterate_average_rate(num_averaged: Any) -> Any:
    """Weight of the next iterate in a running average of ``num_averaged`` iterates, such
    that iterate ``i`` (from 1) carries weight ``i^5``: ``6 / (n + 6)`` (Polyak-Ruppert
    averaging that forgets the start: the first half of a run keeps 1.6% of the weight,
    so that a start that takes half the run to reach the posterior, as with Adam(1e-3),
    barely enters the average; docs/minibatch.md section 12)."""
    return 6.0 / (num_averaged + 6.0)
