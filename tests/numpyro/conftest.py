"""NumPyro tests: skipped as a whole where NumPyro is not installed."""

import pytest

pytest.importorskip("jax")
pytest.importorskip("numpyro")
