"""A Flax DLinear and a NumPyro likelihood over forecast windows.

The twin of :mod:`pyro_psvi.contrib.forecasting` (whose :class:`~pyro_psvi.contrib.forecasting.Koopa`
has no Flax twin yet): :class:`DLinear` (Zeng et al., AAAI 2023) maps a lookback
window ``(B, L, C)`` to a forecast ``(B, H, C)``, and :func:`forecaster` puts a Gaussian
likelihood with a learned per-channel noise scale on a network whose weights are
sampled by ``numpyro.contrib.module.random_flax_module``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from psvi.checks import check_same_rows

try:
    import flax.linen as nn
except ImportError as error:  # flax is an optional extra
    raise ImportError('numpyro_psvi.contrib.forecasting needs flax: pip install "psvi[flax]".') from error


class DLinear(nn.Module):
    """DLinear: a moving-average trend/seasonal split, one dense map ``L -> H`` per part
    (``seasonal`` and ``trend``), shared across channels; kernels start at ``1 / L``."""

    lookback: int
    horizon: int
    kernel_size: int = 25

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        trend = moving_average(x, self.kernel_size)
        init = nn.initializers.constant(1.0 / self.lookback)
        seasonal = nn.Dense(self.horizon, kernel_init=init, name="seasonal")(jnp.swapaxes(x - trend, 1, 2))
        trend = nn.Dense(self.horizon, kernel_init=init, name="trend")(jnp.swapaxes(trend, 1, 2))
        return jnp.swapaxes(seasonal + trend, 1, 2)


def moving_average(x: jnp.ndarray, kernel_size: int) -> jnp.ndarray:
    """Centered moving average over axis 1 of ``(B, L, C)``, ends padded by repetition."""
    pad = (kernel_size - 1) // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
    total = jnp.cumsum(jnp.pad(padded, ((0, 0), (1, 0), (0, 0))), axis=1)
    return (total[:, kernel_size:] - total[:, :-kernel_size]) / kernel_size


def forecaster(
    net: Callable[[], Callable[[jnp.ndarray], jnp.ndarray]],
    x: jnp.ndarray,
    y: jnp.ndarray | None = None,
    *,
    noise_prior_scale: float = 1.0,
    subsample_size: int | None = None,
) -> None:
    """Gaussian likelihood on the forecasts of a network, windows in a subsampled plate.

    ``net()`` samples the network's weights (e.g. it calls ``random_flax_module``) and
    returns its forward function; it is called before the plate, so the weights are
    global latents. ``y[i] ~ Normal(forward(x[i]), noise_scale)`` independently over
    horizon steps, with a per-channel ``noise_scale ~ HalfNormal(noise_prior_scale)``.
    Sites: ``noise_scale``, the network's, ``mean`` (deterministic) and ``y``, as in
    :func:`pyro_psvi.contrib.forecasting.forecaster`.
    """
    channels = x.shape[-1]
    noise = numpyro.sample(
        "noise_scale", dist.HalfNormal(jnp.full((channels,), noise_prior_scale)).to_event(1)
    )
    forward = net()
    check_same_rows(x.shape, None if y is None else y.shape)
    with numpyro.plate("windows", x.shape[0], subsample_size=subsample_size) as idx:
        mean = forward(x[idx])
        numpyro.deterministic("mean", mean)
        numpyro.sample("y", dist.Normal(mean, noise).to_event(2), obs=None if y is None else y[idx])
