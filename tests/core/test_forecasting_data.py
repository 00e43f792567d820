"""Forecasting data and metrics: the ETT split, sliding windows, the forecast report."""

import numpy as np
import pytest

from psvi.contrib.datasets import ETT_BORDERS, ett_path, load_ett, sliding_windows
from psvi.metrics import forecast_report, interval_coverage, interval_width


def test_ett_split_follows_the_protocol(datasets_root):
    root = datasets_root / "ett"
    if ett_path("ETTh1", root) is None:
        pytest.skip("ETTh1.csv is not in the data folder")
    split = load_ett("ETTh1", lookback=96, root=root)
    assert ETT_BORDERS == (0, 8640, 11520, 14400)
    assert split.train.shape == (8640, 7)
    assert split.val.shape == split.test.shape == (2880 + 96, 7)
    np.testing.assert_allclose(split.train.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(split.train.std(0), 1.0, atol=1e-4)
    # validation and test start one lookback early: their first target row is their own first row
    np.testing.assert_array_equal(split.val[:96], split.train[-96:])
    np.testing.assert_array_equal(split.test[:96], split.val[-96:])
    raw = np.genfromtxt(ett_path("ETTh1", root), delimiter=",", skip_header=1, usecols=range(1, 8))
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
