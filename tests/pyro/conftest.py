"""Pyro tests: skipped as a whole where Pyro is not installed."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("pyro")


import pyro  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def fresh_pyro():
    """An empty param store, seed 0 and one torch thread for the test (the store emptied
    again after it)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(1)
    yield
    pyro.clear_param_store()
