"""Fixtures for every test folder: where the project's data lie.

Library code never guesses data locations; tests find them here: ``$PSVI_DATA``, else
the ``shared/datasets`` folder beside the checkout (the project's data folder). Tests
that need a data set take a fixture and are skipped where it is absent.

JAX compiles through a persistent cache in each worker's temporary folder, so that the
many tests that build the same model and guide compile its programs once (the cache
serves an executable only for the same program, so no result changes), and without
LLVM's optimisation passes: the suite's programs are small and run briefly, so their
compile time dominates (those passes cost about a fifth of the NumPyro tests' time).
Benchmarks and users compile with XLA's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Read when JAX's CPU backend starts (first use), so set before any test imports JAX.
os.environ["XLA_FLAGS"] = " ".join(
    flag
    for flag in (
        os.environ.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    )
    if flag
)

# One BLAS/OpenMP thread per process (torch's intra-op pool, NumPy's BLAS): the suite runs
# in as many xdist workers as the machine has cores, and two workers with two threads each
# oversubscribe a two-core machine (tests/cross: 239 s with torch's default, 211 s so).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPOSITORY = Path(__file__).resolve().parents[1]


def _data_folder() -> Path | None:
    root = Path(os.environ.get("PSVI_DATA", REPOSITORY.parent / "shared" / "datasets"))
    return root if root.is_dir() else None


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every compiled JAX program cached in this worker's temporary folder (a fresh,
    per-worker folder: no other process writes to it while it is read)."""
    try:
        import jax
    except ImportError:
        return
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
