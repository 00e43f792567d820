"""Real-data pieces: the UCI split loader and the MNIST loader (on ../shared/datasets,
skipped where it is absent) and the BNN regression model, whose log joints
must agree between the backends at the same weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pyro
import pytest
import torch
from numpyro.infer.util import log_density

from numpyro_psvi.models import bnn_regression as n_bnn_regression
from psvi.datasets import load_mnist, load_uci, mnist_path, uci_folder, uci_info
from pyro_psvi.models import bnn_regression as p_bnn_regression


def _have_uci() -> bool:
    try:
        uci_folder("yacht")
    except FileNotFoundError:
        return False
    return True


needs_uci = pytest.mark.skipif(not _have_uci(), reason="UCI splits not found (set PSVI_UCI)")


@needs_uci
def test_uci_splits_are_standardized_on_the_training_part():
    split = load_uci("yacht", 3)
    assert split.x_train.shape == (277, 6) and split.x_test.shape == (31, 6)
    np.testing.assert_allclose(split.x_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(split.x_train.std(0), 1.0, atol=1e-4)
    assert abs(float(split.y_train.mean())) < 1e-5 and abs(float(split.y_train.std()) - 1.0) < 1e-4
    data = np.loadtxt(uci_folder("yacht") / "data.txt")
    test_rows = np.loadtxt(uci_folder("yacht") / "index_test_3.txt", dtype=int)
    np.testing.assert_allclose(split.y_mean + split.y_std * split.y_test, data[test_rows, 6], rtol=1e-5)
    assert uci_info("protein-tertiary-structure") == {"num_splits": 5, "hidden": 100, "epochs": 20}
    naval = load_uci("naval-propulsion-plant", 0)  # constant columns: std replaced by 1
    assert np.isfinite(naval.x_train).all()


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown UCI dataset 'boston'; available: bostonHousing"):
        load_uci("boston", 0)


def test_bnn_regression_log_joint_agrees_between_backends():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=7).astype(np.float32)
    values = {
        "w1": rng.normal(size=(3, 5)).astype(np.float32), "b1": rng.normal(size=5).astype(np.float32),
        "w2": rng.normal(size=5).astype(np.float32), "b2": np.float32(0.3), "precision": np.float32(1.7),
    }  # fmt: skip
    n_log_joint, _ = log_density(
        lambda: n_bnn_regression(jnp.asarray(x), jnp.asarray(y), hidden=5), (), {},
        {k: jnp.asarray(v) for k, v in values.items()},
    )  # fmt: skip
    p_values = {k: torch.as_tensor(v) for k, v in values.items()}
    p_values["w2"], p_values["b2"] = p_values["w2"][:, None], p_values["b2"].reshape(1)
    conditioned = pyro.poutine.condition(p_bnn_regression, data=p_values)
    trace = pyro.poutine.trace(conditioned).get_trace(torch.as_tensor(x), torch.as_tensor(y), hidden=5)
    assert math.isclose(float(trace.log_prob_sum()), float(n_log_joint), rel_tol=1e-5)
    assert jax.numpy.isfinite(n_log_joint)


@pytest.mark.skipif(mnist_path() is None, reason="mnist.npz not found (set PSVI_MNIST)")
def test_mnist_loader_reads_the_local_file_and_subsets():
    full = load_mnist()
    assert full.x_train.shape == (60000, 784) and full.x_test.shape == (10000, 784)
    assert set(np.unique(full.y_test)) == set(range(10))
    subset = load_mnist(num_train=1000, seed=3)
    assert subset.x_train.shape == (1000, 784) and subset.x_test.shape == (10000, 784)
    np.testing.assert_allclose(subset.x_train.mean(0)[subset.x_train.std(0) > 0], 0.0, atol=1e-4)
    assert np.array_equal(load_mnist(num_train=1000, seed=3).y_train, subset.y_train)


def test_mnist_without_a_file_or_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("psvi.datasets.mnist_path", lambda root=None: None)
    with pytest.raises(FileNotFoundError, match="set PSVI_MNIST, or pass download=True"):
        load_mnist(root=tmp_path)
