"""Pieces of an ArviZ export that need neither backend (NumPy; xarray and ArviZ imported
lazily). The export is ArviZ 0.x's ``InferenceData`` or ArviZ 1.x's ``xarray.DataTree``
(its data layer, ``arviz-base``), whichever the installed ArviZ makes (:func:`use_datatree`)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Any

import numpy as np

# Log weights within this many nats of each other agree to 1%: importance sampling is
# exact to that precision (bounded weights have no tail), and a Pareto fit to their tail
# would fit the float round-off of the log densities (~1e-5 nats for float32 log joints
# of a few hundred nats), which gives any k-hat, inf included.
CONSTANT_LOG_WEIGHTS = 1e-2


def _arviz_major() -> int | None:
    """The installed ``arviz``'s major version (read without importing it), ``None`` without one."""
    try:
        return int(version("arviz").split(".")[0])
    except PackageNotFoundError:
        return None


ARVIZ_1_PACKAGES = "pip install arviz-base arviz-stats (ArviZ 1.x's data and statistics layers)"


def use_datatree(datatree: bool | None) -> bool:
    """Whether an export is ArviZ 1.x's ``xarray.DataTree`` (built by ``arviz-base``) rather
    than ArviZ 0.x's ``InferenceData``: ``datatree`` when given, else what the installed
    ArviZ makes (a DataTree with ArviZ >= 1, or with no ``arviz`` but ``arviz-base``). A
    container whose library is missing is an ``ImportError`` that names the package."""
    major = _arviz_major()
    if datatree is None:
        datatree = major is None or major >= 1
    if datatree and find_spec("arviz_base") is None:
        raise ImportError(f"An xarray.DataTree export needs arviz-base: {ARVIZ_1_PACKAGES}.")
    if not datatree and (major is None or major >= 1):
        installed = "no arviz is installed" if major is None else f"arviz {version('arviz')} makes DataTrees"
        raise ImportError(
            f"An InferenceData export needs ArviZ 0.x ({installed}): pip install 'arviz<1', "
            "or pass datatree=True (or leave it None) for a DataTree."
        )
    return datatree


def from_groups(groups: dict[str, dict], coords: dict, dims: dict, datatree: bool) -> Any:
    """The export of ``groups`` (``{group: {variable: array}}``, the sampled groups'
    arrays ``(chain, draw, ...)``) with ``coords`` and ``dims``: ``arviz_base.from_dict``'s
    ``xarray.DataTree`` or ``arviz.from_dict``'s ``InferenceData``, as ``datatree``
    (resolved by :func:`use_datatree` before the export's draws) says."""
    if datatree:
        import arviz_base

        return arviz_base.from_dict(groups, coords=coords, dims=dims)
    import arviz as az

    return az.from_dict(**groups, coords=coords, dims=dims)


def pareto_khat(log_weights: np.ndarray) -> float:
    """PSIS Pareto k-hat of ``log_weights`` (ArviZ's ``psislw``: ArviZ 0.x's, else
    ``arviz-stats``'); ``-inf`` when they are constant to within
    :data:`CONSTANT_LOG_WEIGHTS` nats (an exact fit)."""
    log_weights = np.asarray(log_weights, np.float64)
    if np.ptp(log_weights) < CONSTANT_LOG_WEIGHTS:
        return float("-inf")
    major = _arviz_major()
    if major is not None and major < 1:
        import arviz as az

        return float(az.psislw(log_weights)[1])
    if find_spec("arviz_stats") is None:
        raise ImportError(f"The PSIS k-hat needs ArviZ: {ARVIZ_1_PACKAGES}, or pip install 'arviz<1'.")
    import arviz_stats  # noqa: F401  (registers the .azstats accessor)
    import xarray as xr

    # arviz-stats' psislw takes the log-likelihood values of PSIS-LOO, whose log weights are
    # their negatives: pass -log_weights (checked against ArviZ 0.x's on known tail shapes).
    return float(xr.DataArray(-log_weights, dims=["draw"]).azstats.psislw(dim="draw")[1])


def pseudo_chains(samples: dict, num_chains: int) -> dict[str, np.ndarray]:
    """Split iid draws ``(S, ...)`` into ``(num_chains, S // num_chains, ...)`` pseudo-chains."""
    out = {}
    for name, value in samples.items():
        value = np.asarray(value)
        draws = value.shape[0] // num_chains
        out[name] = value[: num_chains * draws].reshape((num_chains, draws) + value.shape[1:])
    return out


def dim_names(name: str, ndim: int, event_dim: int, plates: dict[int, str]) -> list[str]:
    """Dim names of a site's value: the plate's name where a plate (``{dim: name}``, dims
    negative and counted from the right of the batch shape) sits, else ``name_dim_i``."""
    batch_ndim = ndim - event_dim
    return [
        plates.get(axis - batch_ndim, f"{name}_dim_{axis}") if axis < batch_ndim else f"{name}_dim_{axis}"
        for axis in range(ndim)
    ]


VI_DRAWS_NOTE = (
    "iid draws from a variational guide, split into pseudo-chains: their ESS and R-hat "
    "carry no information about the fit; see sample_stats khat, elbo, fisher"
)


def add_fit_stats(
    idata: Any,
    losses: Any = None,
    num_score_calls: int | None = None,
    diagnostics: dict[str, float] | None = None,
) -> None:
    """Describe the VI fit in ``idata`` (an ``InferenceData`` or a ``DataTree``): a
    ``sample_stats`` group with the fit's loss trace (dim ``step``), its score-call count
    and the guide's diagnostics (``khat``, ``elbo``, ``fisher`` as ``vi_diagnostics``
    returns them), when given; and a note on the posterior group that its draws are iid
    (:data:`VI_DRAWS_NOTE`)."""
    import xarray as xr

    idata.posterior.attrs["inference"] = "variational"
    idata.posterior.attrs["draws"] = VI_DRAWS_NOTE
    stats = {}
    if losses is not None:
        stats["loss"] = xr.DataArray(np.asarray(losses), dims=["step"])
    if num_score_calls is not None:
        stats["num_score_calls"] = xr.DataArray(int(num_score_calls))
    for name, value in (diagnostics or {}).items():
        stats[name] = xr.DataArray(float(value))
    if stats and hasattr(idata, "add_groups"):  # InferenceData
        idata.add_groups(sample_stats=xr.Dataset(stats))
    elif stats:  # DataTree
        idata["sample_stats"] = xr.Dataset(stats)
