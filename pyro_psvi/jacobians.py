"""``log|det J|`` of the support bijections, computed where their own formula fails in
float32: the twin of :mod:`numpyro_psvi.jacobians`, whose docstring says why (torch's
``StickBreakingTransform`` takes the same ``log y``; its clamp turns the overflowed
cotangent of a coordinate near 1.18e-38 into a score of 0 or inf where it is about ``N/B``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.distributions.transforms import StickBreakingTransform, Transform


def stick_breaking_log_det(x: torch.Tensor) -> torch.Tensor:
    """``log|det J|`` of ``StickBreakingTransform`` at ``x``: ``sum_i log y_i + log
    sigmoid(x'_i) - x'_i`` with ``x' = x - log(K - i)`` and ``log y_i = log sigmoid(x'_i) +
    sum_{j<i} log sigmoid(-x'_j)``."""
    offset = torch.arange(x.shape[-1], 0, -1, dtype=x.dtype, device=x.device)
    shifted = x - offset.log()
    log_z, log_rest = F.logsigmoid(shifted), F.logsigmoid(-shifted)
    log_y = log_z + log_rest.cumsum(-1) - log_rest
    return (log_y + log_z - shifted).sum(-1)


STABLE_LOG_DETS: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    StickBreakingTransform: stick_breaking_log_det
}
"""``{transform type: log|det J| from x alone}``, one registered function per bijection
whose own formula loses its gradient in float32."""


def log_abs_det_jacobian(transform: Transform, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``transform``'s ``log|det J|`` at ``x`` (``y = transform(x)``): its own, or the
    stable one of :data:`STABLE_LOG_DETS`."""
    stable = STABLE_LOG_DETS.get(type(transform))
    return transform.log_abs_det_jacobian(x, y) if stable is None else stable(x)
