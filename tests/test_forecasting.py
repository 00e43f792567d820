"""Forecasting: the ETT split, sliding windows, DLinear and Koopa, the forecast metrics
and a Bayesian forecaster fitted by ProximalScoreVI."""

from functools import partial

import numpy as np
import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal, init_to_value

from psvi.datasets import ETT_BORDERS, ett_path, load_ett, sliding_windows
from psvi.metrics import forecast_report, interval_coverage, interval_width
from pyro_psvi import ProximalScoreVI
from pyro_psvi.forecasting import DLinear, Koopa, _least_squares, forecaster, mask_spectrum, moving_average
from pyro_psvi.models import bayesian_module, fan_in_prior


@pytest.mark.skipif(ett_path("ETTh1") is None, reason="ETTh1.csv not available (../shared/datasets/ett)")
def test_ett_split_follows_the_protocol():
    split = load_ett("ETTh1", lookback=96)
    assert ETT_BORDERS == (0, 8640, 11520, 14400)
    assert split.train.shape == (8640, 7)
    assert split.val.shape == split.test.shape == (2880 + 96, 7)
    np.testing.assert_allclose(split.train.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(split.train.std(0), 1.0, atol=1e-4)
    # validation and test start one lookback early: their first target row is their own first row
    np.testing.assert_array_equal(split.val[:96], split.train[-96:])
    np.testing.assert_array_equal(split.test[:96], split.val[-96:])
    raw = np.genfromtxt(ett_path("ETTh1"), delimiter=",", skip_header=1, usecols=range(1, 8))
    np.testing.assert_allclose(split.test[96] * split.scale + split.mean, raw[11520], rtol=1e-5)
    x, _ = sliding_windows(split.test, 96, 96)
    assert len(x) == 2785  # the count every paper on this protocol evaluates


def test_sliding_windows_exact():
    series = np.arange(20.0).reshape(10, 2)
    x, y = sliding_windows(series, lookback=3, horizon=2)
    assert x.shape == (6, 3, 2) and y.shape == (6, 2, 2)
    np.testing.assert_array_equal(x[4], series[4:7])
    np.testing.assert_array_equal(y[4], series[7:9])
    with pytest.raises(ValueError, match="no window"):
        sliding_windows(series, 8, 3)


def test_moving_average_keeps_constants_and_ramps():
    ramp = torch.arange(30.0).reshape(1, 30, 1).expand(2, 30, 3)
    smooth = moving_average(ramp, 5)
    assert smooth.shape == ramp.shape
    torch.testing.assert_close(smooth[:, 2:-2], ramp[:, 2:-2])  # interior of a ramp is unchanged
    torch.testing.assert_close(moving_average(torch.ones(1, 10, 2), 7), torch.ones(1, 10, 2))


@pytest.mark.parametrize("n", [3, 12])  # under- and over-determined
def test_least_squares_is_the_minimum_norm_solution(n):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, n, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(4, n, 6, generator=generator, dtype=torch.float64)
    expected = torch.linalg.pinv(a) @ b
    # the ridge is 1e-6 of the mean Gram diagonal: the solution moves by O(1e-6 cond^2)
    torch.testing.assert_close(_least_squares(a, b), expected, rtol=1e-4, atol=1e-4)


def test_koopa_shapes_split_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(5, 50, 3)  # lookback not a multiple of the segment length: padded
    net = Koopa(50, 30, 3, mask_spectrum(x, alpha=0.2), segment_length=24, dynamic_dim=16, hidden_dim=16)
    out = net(x)
    assert out.shape == (5, 30, 3)
    variant, invariant = net._split(x)
    torch.testing.assert_close(variant + invariant, x)
    spectrum = torch.fft.rfft(invariant, dim=1).abs()
    outside = torch.ones(spectrum.shape[1], dtype=torch.bool)
    outside[net.mask] = False
    assert spectrum[:, outside].max() < 1e-4  # the time-invariant part holds only the masked bins
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_forecast_report_on_tiny_inputs():
    targets = np.array([[0.0, 1.0], [2.0, 3.0]])
    point = targets + np.array([[1.0, -1.0], [0.5, 0.0]])
    samples = np.stack([targets - 1.0, targets, targets + 1.0] * 2)  # 6 draws at y-1, y, y+1
    report = forecast_report(point, samples, targets)
    assert report["mse"] == pytest.approx((1 + 1 + 0.25 + 0) / 4)
    assert report["mae"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    # CRPS of a symmetric three-point ensemble at y: E|X-y| - E|X-X'|/2 = 2/3 - (8/9)/2 = 2/9
    assert report["crps"] == pytest.approx(2 / 9)
    assert report["coverage_90"] == 1.0 and report["coverage_50"] == 1.0
    # the 5% and 95% quantiles of {-1, -1, 0, 0, 1, 1} (linear interpolation): -1 and 1
    assert report["width_90"] == pytest.approx(2.0)
    assert interval_width(samples, 0.5) == pytest.approx(1.5)  # quantiles 0.25 / 0.75: -0.75 / 0.75
    assert interval_coverage(samples + 5.0, targets, 0.9) == 0.0


def _small_koopa(x):
    return Koopa(24, 12, 2, mask_spectrum(x), dynamic_dim=8, hidden_dim=8)


@pytest.mark.parametrize(("make", "steps"), [(lambda x: DLinear(24, 12), 60), (_small_koopa, 125)])
def test_bayesian_forecaster_fits_a_sine(make, steps):
    """ProximalScoreVI brings the forecast of a noisy two-channel sine (noise sd 0.05) far
    below the series' variance (0.5 per channel): the whole pipeline learns. Measured
    MSE 0.004 (DLinear, 50 steps) and 0.009 (Koopa, 125 steps)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    t = torch.arange(400.0)
    series = torch.stack([torch.sin(2 * np.pi * t / 12), torch.cos(2 * np.pi * t / 12)], -1)
    series = series + 0.05 * torch.randn_like(series)
    x, y = (torch.as_tensor(np.ascontiguousarray(a)) for a in sliding_windows(series.numpy(), 24, 12))
    net = make(x)
    init = {name: p.detach().clone() for name, p in net.named_parameters()}
    init["noise_scale"] = torch.full((2,), 0.5)
    bayesian_module(net, fan_in_prior())
    model = partial(forecaster, net, subsample_size=32)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
    engine = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), num_particles=2,
                             vectorize_particles=False)  # fmt: skip
    for _ in range(steps):
        engine.step(x, y)
    assert engine.num_rejected == 0
    with torch.no_grad():
        mse = ((pyro.poutine.condition(net, data=guide.median())(x) - y) ** 2).mean()
    assert mse < 0.05  # 10x below the variance of a unit sine (0.5)


def test_pyro_and_numpyro_forecasters_agree():
    """The same DLinear weights give the same forecasts and the same log joint (priors,
    noise scale and likelihood) in both backends: the two forecasters are one model."""
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from numpyro.contrib.module import random_flax_module
    from numpyro.infer.util import log_density

    from numpyro_psvi import forecasting as nforecasting
    from numpyro_psvi.models import fan_in_prior as numpyro_fan_in_prior

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 24, 3)).astype(np.float32)
    y = rng.standard_normal((6, 12, 3)).astype(np.float32)
    net = DLinear(24, 12, kernel_size=5)
    values = {name: p.detach().clone() + 0.1 * torch.randn_like(p) for name, p in net.named_parameters()}
    values["noise_scale"] = torch.tensor([0.5, 0.8, 1.3])
    bayesian_module(net, fan_in_prior(2.0))
    pyro_model = pyro.poutine.condition(partial(forecaster, net), data=values)
    trace = pyro.poutine.trace(pyro_model).get_trace(torch.as_tensor(x), torch.as_tensor(y))
    pyro_log_joint = float(trace.log_prob_sum())

    flax_net = nforecasting.DLinear(24, 12, kernel_size=5)

    def make_net():
        return random_flax_module("dlinear", flax_net, numpyro_fan_in_prior(2.0), input_shape=(1, 24, 3))

    params = {"noise_scale": jnp.asarray(values["noise_scale"].numpy())}
    for part in ("seasonal", "trend"):
        params[f"dlinear/{part}.kernel"] = jnp.asarray(values[f"{part}.weight"].numpy().T)
        params[f"dlinear/{part}.bias"] = jnp.asarray(values[f"{part}.bias"].numpy())
    numpyro_log_joint, model_trace = log_density(
        partial(nforecasting.forecaster, make_net), (jnp.asarray(x), jnp.asarray(y)), {}, params
    )
    np.testing.assert_allclose(
        np.asarray(model_trace["mean"]["value"]), trace.nodes["mean"]["value"].detach().numpy(), atol=1e-5
    )
    # float32 sums of ~600 terms of size ~1: agreement to a few ulps of the total
    assert float(numpyro_log_joint) == pytest.approx(pyro_log_joint, rel=1e-5)
