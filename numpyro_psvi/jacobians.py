"""``log|det J|`` of the support bijections, computed where their own formula fails in
float32 (the twin of :mod:`pyro_psvi.jacobians`), and their images kept in the support
where float32 leaves it.

NumPyro's ``StickBreakingTransform`` (the simplex's bijection) takes ``log y`` of the
simplex point it maps to: a coordinate at float32's smallest normal (``y ~ 1e-38``, where
the transform clips it; a Dirichlet draw with a concentration near 0.05 lands there about
once in 80 coordinates) has a cotangent ``1 / y ~ 8.5e37``, which a plate's ``N/B > 4``
scales past float32's range: the score of that coordinate comes out inf, NaN or 0 where
it is about ``N/B`` (NumPyro's ProdLDA example rejected 371 of 1,000 updates on it). The
same ``log|det J|`` computed from ``x`` alone (each ``log y_i`` a sum of log-sigmoids) has
the right, finite gradient there and the same value to round-off elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from numpyro.distributions.transforms import StickBreakingTransform, Transform


def stick_breaking_log_det(x: jax.Array) -> jax.Array:
    """``log|det J|`` of ``StickBreakingTransform`` at ``x``: ``sum_i log y_i + log
    sigmoid(x'_i) - x'_i`` with ``x' = x - log(K - i)`` and ``log y_i = log sigmoid(x'_i) +
    sum_{j<i} log sigmoid(-x'_j)``."""
    shifted = x - jnp.log(x.shape[-1] - jnp.arange(x.shape[-1]))
    log_z, log_rest = jax.nn.log_sigmoid(shifted), jax.nn.log_sigmoid(-shifted)
    log_y = log_z + jnp.cumsum(log_rest, -1) - log_rest
    return jnp.sum(log_y + log_z - shifted, -1)


STABLE_LOG_DETS: dict[type, Callable[[jax.Array], jax.Array]] = {
    StickBreakingTransform: stick_breaking_log_det
}
"""``{transform type: log|det J| from x alone}``, one registered function per bijection
whose own formula loses its gradient in float32."""


def stick_breaking_forward(transform: StickBreakingTransform, x: jax.Array) -> jax.Array:
    """The simplex point of ``x``, each coordinate at least float32's smallest normal: the
    transform clips each stick fraction there, but a later coordinate is that fraction times
    the stick left, which falls below it, and XLA's CPU flushes such subnormals to 0, where
    a Dirichlet's density is NaN. The clip is the one the PPLs' Dirichlet samplers apply to
    their draws, so a guide's draw maps back to the point it was."""
    value = transform(x)
    return jnp.maximum(value, jnp.finfo(value.dtype).tiny)


STABLE_FORWARDS: dict[type, Callable[[Transform, jax.Array], jax.Array]] = {
    StickBreakingTransform: stick_breaking_forward
}
"""``{transform type: transform(x) kept in the support's interior}``, one registered
function per bijection whose float32 image can leave it."""


def constrained_value(transform: Transform, x: jax.Array) -> jax.Array:
    """``transform(x)``, or the one of :data:`STABLE_FORWARDS`."""
    stable = STABLE_FORWARDS.get(type(transform))
    return transform(x) if stable is None else stable(transform, x)


def log_abs_det_jacobian(transform: Transform, x: jax.Array, y: jax.Array) -> jax.Array:
    """``transform``'s ``log|det J|`` at ``x`` (``y = transform(x)``): its own, or the
    stable one of :data:`STABLE_LOG_DETS`."""
    stable = STABLE_LOG_DETS.get(type(transform))
    return transform.log_abs_det_jacobian(x, y) if stable is None else stable(x)
