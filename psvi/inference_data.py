"""Pieces of an ArviZ export that need neither backend (NumPy; xarray imported lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np

# Log weights within this many nats of each other agree to 1%: importance sampling is
# exact to that precision (bounded weights have no tail), and a Pareto fit to their tail
# would fit the float round-off of the log densities (~1e-5 nats for float32 log joints
# of a few hundred nats), which gives any k-hat, inf included.
CONSTANT_LOG_WEIGHTS = 1e-2


def pareto_khat(log_weights: np.ndarray) -> float:
    """PSIS Pareto k-hat of ``log_weights`` (ArviZ's ``psislw``); ``-inf`` when they are
    constant to within :data:`CONSTANT_LOG_WEIGHTS` nats (an exact fit)."""
    log_weights = np.asarray(log_weights, np.float64)
    if np.ptp(log_weights) < CONSTANT_LOG_WEIGHTS:
        return float("-inf")
    import arviz as az

    return float(az.psislw(log_weights)[1])


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
    """Describe the VI fit in ``idata``: a ``sample_stats`` group with the fit's loss
    trace (dim ``step``), its score-call count and the guide's diagnostics (``khat``,
    ``elbo``, ``fisher`` as ``vi_diagnostics`` returns them), when given; and a note on
    the posterior group that its draws are iid (:data:`VI_DRAWS_NOTE`)."""
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
    if stats:
        idata.add_groups(sample_stats=xr.Dataset(stats))
