"""Tests of both backends together: skipped as a whole unless both are installed."""

import pytest

for module in ("jax", "numpyro", "torch", "pyro"):
    pytest.importorskip(module)
