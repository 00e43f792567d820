"""Discrete latents summed out of the log joint by parallel enumeration.

A model's discrete latent sites marked ``infer={"enumerate": "parallel"}`` (or by
``pyro.infer.config_enumerate``) are not fitted by the guide: the engine runs the model
under ``poutine.enum``, which puts each such site's support along a dim left of the
plates, and sums the sites out of the log joint exactly, as ``TraceEnum_ELBO`` does
(Pyro's tensor contraction, :func:`pyro.ops.contract.contract_to_tensor`), so the
scores are those of the marginal ``log sum_z p(x, z, theta)`` of the continuous latents
``theta``. The log factors that depend on an enumerated site are summed out unscaled
and masked, and their plates' common ``N/B`` scale is applied to the result (a
subsampled plate's ``N/B`` multiplies each data point's ``log sum_z``, not the terms
inside it); like ``TraceEnum_ELBO``, the sites summed out together must share one scale.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import site_is_subsample

from psvi.checks import EnumerationError, enumeration_scale_message


def enumerated_sites(model_trace) -> tuple[str, ...]:
    """The latent sites of a trace marked for parallel enumeration."""
    return tuple(
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        and site["infer"].get("enumerate") == "parallel"
    )  # fmt: skip


def is_continuous_latent(site: dict) -> bool:
    """Whether a trace's site is a latent the guide fits: a sample site, not observed,
    not a plate's indices, not discrete (those are summed out)."""
    return (
        site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        and not site["fn"].support.is_discrete
    )  # fmt: skip


def enumerated_model(model: Callable, max_plate_nesting: int) -> Callable:
    """``model`` under ``poutine.enum`` with its enumeration dims left of the model's plates
    and of the engine's particle plate (at ``-(max_plate_nesting + 1)``)."""
    return poutine.enum(model, first_available_dim=-(max_plate_nesting + 2))


def _is_enumerated(model_trace) -> bool:
    """Whether a trace holds enumerated values (a run of :func:`enumerated_model`)."""
    return any(
        site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
        for site in model_trace.nodes.values()
    )


def sum_out_enumerated(model_trace, particle_plate: str | None) -> tuple[torch.Tensor | float, set[str]]:
    """The enumerated sites summed out of a run's log joint (0 and no sites for a run
    without enumerated values).

    Parameters
    ----------
    model_trace : pyro.poutine.Trace
        A run of the model (of :func:`enumerated_model` for a model with enumerated
        sites), inside ``particle_plate`` when given.
    particle_plate : str or None
        The vectorized particle plate's name (``None`` for one particle's run).

    Returns
    -------
    marginal : torch.Tensor
        The scaled ``log sum_z`` of the log factors that depend on an enumerated site:
        over the particle plate's dim (a ``(num,)`` tensor or one that broadcasts to it),
        or 0-dim without one.
    covered : set of str
        The sites whose log factors it holds (the rest enter the log joint as usual).
    """
    if not _is_enumerated(model_trace):
        return 0.0, set()
    model_trace.compute_log_prob(site_filter=lambda name, site: not site_is_subsample(site))
    model_trace.pack_tensors()
    plates = set(model_trace.plate_to_symbol.values())
    enum_dims = set(model_trace.symbol_to_dim) - plates
    factors: OrderedDict[frozenset, list[torch.Tensor]] = OrderedDict()
    covered, scales = set(), []
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        term = site["packed"]
        if enum_dims.isdisjoint(term["log_prob"]._pyro_dims):
            continue
        ordinal = frozenset(
            model_trace.plate_to_symbol[frame.name] for frame in site["cond_indep_stack"] if frame.vectorized
        )
        # The mask inside the sum over z, the scale outside it (as TraceEnum_ELBO).
        unscaled = packed.scale_and_mask(term["unscaled_log_prob"], mask=term["mask"])
        factors.setdefault(ordinal, []).append(unscaled)
        covered.add(name)
        scales.append(site["scale"])
    target = frozenset() if particle_plate is None else {model_trace.plate_to_symbol[particle_plate]}
    marginal = contract_to_tensor(factors, enum_dims, target_ordinal=frozenset(target))
    marginal = marginal.reshape(-1 if marginal.dim() else ())
    return _common_scale(scales, sorted(covered)) * marginal, covered


def _common_scale(scales: list, names: list[str]) -> float:
    """The one scale of the sites summed out together (refused when they differ)."""
    found = set()
    for scale in scales:
        if torch.is_tensor(scale) and scale.dim():
            raise EnumerationError(enumeration_scale_message(names, "pyro"))
        found.add(float(scale))
    if len(found) != 1:
        raise EnumerationError(enumeration_scale_message(names, "pyro"))
    return found.pop()
