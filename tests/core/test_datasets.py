"""Real-data loaders: the UCI splits and MNIST, read from the data folder of the
``datasets_root`` fixture (skipped where it is absent), and their clear errors."""

import numpy as np
import pytest

from psvi.contrib.datasets import load_mnist, load_uci, mnist_path, uci_folder, uci_info


def test_uci_splits_are_standardized_on_the_training_part(datasets_root):
    root = datasets_root / "uci"
    split = load_uci("yacht", 3, root)
    assert split.x_train.shape == (277, 6) and split.x_test.shape == (31, 6)
    np.testing.assert_allclose(split.x_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(split.x_train.std(0), 1.0, atol=1e-4)
    assert abs(float(split.y_train.mean())) < 1e-5 and abs(float(split.y_train.std()) - 1.0) < 1e-4
    data = np.loadtxt(uci_folder("yacht", root) / "data.txt")
    test_rows = np.loadtxt(uci_folder("yacht", root) / "index_test_3.txt", dtype=int)
    np.testing.assert_allclose(split.y_mean + split.y_std * split.y_test, data[test_rows, 6], rtol=1e-5)
    assert uci_info("protein-tertiary-structure", root) == {"num_splits": 5, "hidden": 100, "epochs": 20}
    naval = load_uci("naval-propulsion-plant", 0, root)  # constant columns: std replaced by 1
    assert np.isfinite(naval.x_train).all()


def test_uci_without_a_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PSVI_UCI", raising=False)
    with pytest.raises(FileNotFoundError, match="pass root=.*or set PSVI_UCI"):
        uci_folder("yacht", tmp_path)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown UCI dataset 'boston'; available: bostonHousing"):
        load_uci("boston", 0)


def test_mnist_loader_reads_the_local_file_and_subsets(datasets_root):
    root = datasets_root / "mnist"
    if mnist_path(root) is None:
        pytest.skip("mnist.npz is not in the data folder")
    full = load_mnist(root=root)
    assert full.x_train.shape == (60000, 784) and full.x_test.shape == (10000, 784)
    assert set(np.unique(full.y_test)) == set(range(10))
    subset = load_mnist(num_train=1000, seed=3, root=root)
    assert subset.x_train.shape == (1000, 784) and subset.x_test.shape == (10000, 784)
    np.testing.assert_allclose(subset.x_train.mean(0)[subset.x_train.std(0) > 0], 0.0, atol=1e-4)
    assert np.array_equal(load_mnist(num_train=1000, seed=3, root=root).y_train, subset.y_train)


def test_mnist_without_a_file_or_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PSVI_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="set PSVI_MNIST, or pass download=True"):
        load_mnist(root=tmp_path)
