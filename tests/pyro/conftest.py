"""Pyro tests: skipped as a whole where Pyro is not installed."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("pyro")
