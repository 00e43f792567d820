"""Deep forecasters as ``torch.nn.Module`` and a Pyro likelihood over forecast windows.

:class:`DLinear` (Zeng et al., "Are Transformers Effective for Time Series
Forecasting?", AAAI 2023) and a compact :class:`Koopa` (Liu et al., "Koopa: Learning
Non-stationary Time Series Dynamics with Koopman Predictors", NeurIPS 2023; written
after the authors' code, github.com/thuml/Koopa) map a lookback window ``(B, L, C)``
to a forecast ``(B, H, C)``. :func:`forecaster` puts a Gaussian likelihood with a
learned per-channel noise scale on any such network; made Bayesian with
:func:`pyro_psvi.contrib.models.bayesian_module`, it is a model for ``ProximalScoreVI``,
``SVI`` or MAP (``AutoDelta``).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from psvi.checks import check_same_rows


class DLinear(nn.Module):
    """DLinear: a moving-average trend/seasonal split, one linear map ``L -> H`` per part,
    shared across channels.

    Parameters
    ----------
    lookback, horizon : int
        Input and output lengths ``L`` and ``H``.
    kernel_size : int
        Width of the moving average (odd; the ends are padded by repetition).
    """

    def __init__(self, lookback: int, horizon: int, kernel_size: int = 25) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.seasonal = nn.Linear(lookback, horizon)
        self.trend = nn.Linear(lookback, horizon)
        for layer in (self.seasonal, self.trend):  # the authors' init: the window mean
            nn.init.constant_(layer.weight, 1.0 / lookback)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trend = moving_average(x, self.kernel_size)
        seasonal = x - trend
        out = self.seasonal(seasonal.transpose(1, 2)) + self.trend(trend.transpose(1, 2))
        return out.transpose(1, 2)


def moving_average(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Centered moving average over axis 1 of ``(B, L, C)``, ends padded by repetition."""
    pad = (kernel_size - 1) // 2
    padded = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
    return nn.functional.avg_pool1d(padded.transpose(1, 2), kernel_size, stride=1).transpose(1, 2)


def mask_spectrum(x: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Koopa's time-invariant frequencies: the ``alpha`` fraction of rFFT bins with the
    largest amplitude, averaged over the training windows ``x (N, L, C)`` and channels."""
    amplitude = torch.fft.rfft(x, dim=1).abs().mean(dim=(0, 2))
    return amplitude.topk(max(int(len(amplitude) * alpha), 1)).indices


class Koopa(nn.Module):
    """Koopa (Liu et al., NeurIPS 2023), compact.

    Each of ``num_blocks`` blocks splits its input with a Fourier filter into a
    time-invariant part (the ``mask`` frequencies), forecast through a learned global
    Koopman operator in an MLP embedding of the whole window, and a time-variant part,
    cut into segments of ``segment_length`` whose embeddings are advanced by a local
    operator fitted to the window itself (DMD); the time-variant backcast is removed
    before the next block, and the blocks' forecasts add up. Inputs are normalized per
    window (mean and standard deviation, not learned) as in the authors' code.

    Departures from the authors' code, both needed for a likelihood: no dropout (a
    Bayesian posterior replaces it; a stochastic network has no score), and the DMD
    least squares carries a tiny ridge (``1e-6`` of the mean Gram diagonal) so that its
    gradient stays finite when the segments' embeddings are nearly collinear.

    Parameters
    ----------
    lookback, horizon, channels : int
        ``L``, ``H`` and ``C``.
    mask : torch.Tensor
        rFFT bin indices of the time-invariant part (:func:`mask_spectrum`).
    segment_length : int
        Length of the time-variant segments (a day for hourly data).
    dynamic_dim, hidden_dim, hidden_layers : int
        Koopman embedding width, MLP width and depth.
    num_blocks : int
        Number of stacked blocks.
    """

    def __init__(
        self,
        lookback: int,
        horizon: int,
        channels: int,
        mask: torch.Tensor,
        *,
        segment_length: int = 24,
        dynamic_dim: int = 64,
        hidden_dim: int = 64,
        hidden_layers: int = 2,
        num_blocks: int = 3,
    ) -> None:
        super().__init__()
        self.lookback, self.horizon, self.channels = lookback, horizon, channels
        self.segment_length = segment_length
        self.num_segments = math.ceil(lookback / segment_length)
        self.num_steps = math.ceil(horizon / segment_length)
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.long))
        segment_dim = segment_length * channels
        # Shared across blocks, so that the Koopman embeddings agree (as in the authors' code).
        self.invariant_encoder = _mlp(lookback, dynamic_dim, hidden_dim, hidden_layers, nn.ReLU)
        self.invariant_decoder = _mlp(dynamic_dim, horizon, hidden_dim, hidden_layers, nn.ReLU)
        self.variant_encoder = _mlp(segment_dim, dynamic_dim, hidden_dim, hidden_layers, nn.Tanh)
        self.variant_decoder = _mlp(dynamic_dim, segment_dim, hidden_dim, hidden_layers, nn.Tanh)
        self.operators = nn.ModuleList()
        for _ in range(num_blocks):  # orthogonal initial Koopman operators (authors' init)
            u, _, v = torch.linalg.svd(torch.randn(dynamic_dim, dynamic_dim))
            operator = nn.Linear(dynamic_dim, dynamic_dim, bias=False)
            operator.weight.data = u @ v
            self.operators.append(operator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True).detach()
        scale = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5).detach()
        residual, forecast = (x - mean) / scale, 0.0
        for operator in self.operators:
            variant, invariant = self._split(residual)
            embedding = operator(self.invariant_encoder(invariant.transpose(1, 2)))
            forecast = forecast + self.invariant_decoder(embedding).transpose(1, 2)
            backcast, variant_forecast = self._time_variant(variant)
            residual = residual - backcast
            forecast = forecast + variant_forecast
        return forecast * scale + mean

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(time-variant, time-invariant) parts of ``x (B, L, C)``."""
        spectrum = torch.fft.rfft(x, dim=1)
        keep = torch.ones(spectrum.shape[1], 1, dtype=x.dtype, device=x.device)
        keep[self.mask] = 0.0
        variant = torch.fft.irfft(spectrum * keep, n=x.shape[1], dim=1)
        return variant, x - variant

    def _time_variant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backcast ``(B, L, C)`` and forecast ``(B, H, C)`` of the time-variant part."""
        batch = x.shape[0]
        padding = self.num_segments * self.segment_length - self.lookback
        x = torch.cat([x[:, self.lookback - padding :], x], dim=1)
        segments = x.reshape(batch, self.num_segments, -1)  # (B, F, P*C), time-major per segment
        z = self.variant_encoder(segments)
        past, future = z[:, :-1], z[:, 1:]
        operator = _least_squares(past, future)  # (B, E, E): future ~ past @ operator
        steps, last = [], z[:, -1:]
        for _ in range(self.num_steps):
            last = last @ operator
            steps.append(last)
        reconstruction = torch.cat([z[:, :1], past @ operator], dim=1)
        backcast = self.variant_decoder(reconstruction).reshape(batch, -1, self.channels)
        forecast = self.variant_decoder(torch.cat(steps, dim=1)).reshape(batch, -1, self.channels)
        return backcast[:, padding:], forecast[:, : self.horizon]


def _least_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minimum-norm ``argmin_K |a K - b|`` for batches ``a (B, n, E)``, ``b (B, n, E)``,
    with a ridge of ``1e-6`` of the mean Gram diagonal (differentiable everywhere)."""
    n, dim = a.shape[-2:]
    under = n <= dim  # under-determined: K = a^T (a a^T + eps I)^-1 b, else (a^T a + eps I)^-1 a^T b
    gram = a @ a.mT if under else a.mT @ a
    ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)[..., None] + 1e-12
    regularized = gram + ridge * torch.eye(gram.shape[-1], dtype=a.dtype, device=a.device)
    if under:
        return a.mT @ torch.linalg.solve(regularized, b)
    return torch.linalg.solve(regularized, a.mT @ b)


def _mlp(d_in: int, d_out: int, hidden: int, layers: int, activation: type[nn.Module]) -> nn.Sequential:
    """``layers`` hidden layers of width ``hidden`` (the authors' ``MLP``, no dropout)."""
    modules: list[nn.Module] = [nn.Linear(d_in, hidden), activation()]
    for _ in range(layers - 2):
        modules += [nn.Linear(hidden, hidden), activation()]
    return nn.Sequential(*modules, nn.Linear(hidden, d_out))


def forecaster(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    noise_prior_scale: float = 1.0,
    subsample_size: int | None = None,
) -> None:
    """Gaussian likelihood on the forecasts of ``net``, windows in a subsampled plate.

    ``y[i] ~ Normal(net(x[i]), noise_scale)`` independently over horizon steps, with a
    per-channel ``noise_scale ~ HalfNormal(noise_prior_scale)``; the network (a
    :func:`pyro_psvi.contrib.models.bayesian_module`) runs outside the plate, so its weights
    are global latents. Overlapping windows count each row once per window that holds
    it, as in the deterministic training loss; the learned noise scale absorbs that.
    Sites: ``noise_scale``, ``mean`` (deterministic, the forecast) and ``y``.
    """
    channels = x.shape[-1]
    noise = pyro.sample(
        "noise_scale", dist.HalfNormal(x.new_full((channels,), noise_prior_scale)).to_event(1)
    )
    check_same_rows(x.shape, None if y is None else y.shape)
    windows = pyro.plate("windows", x.shape[0], subsample_size=subsample_size, device=x.device)
    idx = windows.indices
    mean = net(x[idx])
    with windows:
        pyro.deterministic("mean", mean, event_dim=2)
        pyro.sample("y", dist.Normal(mean, noise).to_event(2), obs=None if y is None else y[idx])
