"""Fixtures for every test folder: where the project's data lie.

Library code never guesses data locations; tests find them here: ``$PSVI_DATA``, else
the ``shared/datasets`` folder beside the checkout (the project's data folder). Tests
that need a data set take a fixture and are skipped where it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def _data_folder() -> Path | None:
    root = Path(os.environ.get("PSVI_DATA", REPOSITORY.parent / "shared" / "datasets"))
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    """The project's data folder (subfolders ``uci``, ``mnist``, ``ett``, ``posteriordb``);
    the test is skipped when there is none."""
    root = _data_folder()
    if root is None:
        pytest.skip("no data folder (set PSVI_DATA or place shared/datasets beside the checkout)")
    return root


@pytest.fixture(scope="session")
def load_posterior() -> Callable:
    """``load_posterior(name)``: a PosteriorDB posterior, shipped or from the data folder;
    the test is skipped when neither holds it."""
    from psvi.contrib import posteriordb

    folder = _data_folder()

    def load(name: str):
        try:
            return posteriordb.load(name, root=folder / "posteriordb" if folder else None)
        except FileNotFoundError:
            pytest.skip(f"posterior {name!r} is not shipped and no data folder holds it")

    return load
