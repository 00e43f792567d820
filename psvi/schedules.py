"""Step-size schedules that need neither backend: each works on a Python number and on
a JAX array (a traced update count) alike."""

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
