"""Discrete latents summed out of the log joint by parallel enumeration.

A model's discrete latent sites marked ``infer={"enumerate": "parallel"}`` (or by
``numpyro.contrib.funsor.config_enumerate``) are not fitted by the guide: the engine
runs the model under ``numpyro.contrib.funsor.enum``, which puts each such site's
support along a dim left of the plates, and sums the sites out of the log joint
exactly, as ``TraceEnum_ELBO`` does (funsor's sum-product contraction; install
``funsor``), so the scores are those of the marginal ``log sum_z p(x, z, theta)`` of the
continuous latents ``theta``. The log factors that depend on an enumerated site are
summed out unscaled, and their plates' common ``N/B`` scale is applied to the result (a
subsampled plate's ``N/B`` multiplies each data point's ``log sum_z``, not the terms
inside it); like ``TraceEnum_ELBO``, the sites summed out together must share one scale.
A chain in ``scan`` goes through ``numpyro.contrib.funsor.log_density``, which handles
scan's time dim and applies scales inside the sum: its sites must be unscaled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from psvi.checks import EnumerationError, enumerated_scan_message, enumeration_scale_message


def enumerated_sites(model_trace: dict) -> tuple[str, ...]:
    """The latent sites of a trace marked for parallel enumeration."""
    return tuple(
        name
        for name, site in model_trace.items()
        if site["type"] == "sample" and not site["is_observed"]
        and site["infer"].get("enumerate") == "parallel"
    )  # fmt: skip


def is_continuous_latent(site: dict) -> bool:
    """Whether a trace's site is a latent the guide fits: a sample site, not observed,
    not discrete (those are summed out)."""
    return site["type"] == "sample" and not site["is_observed"] and not site["fn"].support.is_discrete


def _funsor() -> tuple[Any, Any]:
    """funsor (its JAX backend set) and ``numpyro.contrib.funsor``, imported when a model
    enumerates."""
    try:
        import funsor
        import numpyro.contrib.funsor as contrib
    except ImportError as error:
        raise ImportError(
            "Summing out a model's enumerated discrete latents needs funsor, as NumPyro's "
            "TraceEnum_ELBO does: pip install funsor."
        ) from error
    funsor.set_backend("jax")
    return funsor, contrib


def enumerated_log_density(
    model: Callable, args: tuple, kwargs: dict[str, Any], max_plate_nesting: int
) -> jax.Array:
    """The log joint of one run of ``model`` (seeded, its continuous latents substituted)
    with its enumerated sites summed out; enumeration dims left of ``max_plate_nesting``
    plates."""
    _, contrib = _funsor()
    enumerated = contrib.enum(model, first_available_dim=-(max_plate_nesting + 1))
    with contrib.plate_to_enum_plate():
        model_trace = contrib.trace(enumerated).get_trace(*args, **kwargs)
    if any(_scanned(site) for site in model_trace.values() if site["type"] == "sample"):
        # A chain in scan: its time dim needs NumPyro's own contraction, whose scales
        # are applied inside the sum over z, which is right only where they are 1.
        _check_unscaled(model_trace)
        return contrib.log_density(enumerated, args, kwargs, {})[0]
    marginal, covered = sum_out_enumerated(model_trace)
    total = marginal
    for name, site in model_trace.items():
        if site["type"] == "sample" and name not in covered:
            total = total + jnp.sum(_scaled(site, _log_prob(site)))
    return total


def sum_out_enumerated(model_trace: dict) -> tuple[jax.Array, set[str]]:
    """The scaled ``log sum_z`` of the log factors of an enumerated run (a trace of
    ``numpyro.contrib.funsor.trace``) that depend on an enumerated site, and the sites
    whose factors it holds."""
    funsor, _ = _funsor()
    enum_vars = set(enumerated_sites(model_trace))
    factors, plates, covered, scales = [], set(), set(), []
    for name, site in model_trace.items():
        if site["type"] != "sample":
            continue
        dim_to_name = site["infer"]["dim_to_name"]
        if enum_vars.isdisjoint(dim_to_name.values()):
            continue
        # Unscaled inside the sum over z (a mask is in the site's distribution), the
        # scale outside it (as TraceEnum_ELBO).
        factors.append(funsor.to_funsor(_log_prob(site), output=funsor.Real, dim_to_name=dim_to_name))
        plates.update(frame.name for frame in site["cond_indep_stack"])
        covered.add(name)
        scales.append(site["scale"])
    with funsor.interpretations.lazy:  # contracted in an optimized order (a chain's too)
        lazy = funsor.sum_product.sum_product(
            funsor.ops.logaddexp, funsor.ops.add, factors, eliminate=frozenset(enum_vars | plates),
            plates=frozenset(plates),
        )  # fmt: skip
    contracted = funsor.optimizer.apply_optimizer(lazy)
    return _common_scale(scales, sorted(covered)) * contracted.data, covered


def _scanned(site: dict) -> bool:
    """Whether a site of an enumerated run is inside ``scan`` (has a time dim)."""
    return any(name.startswith(("_time", "_PREV_")) for name in site["infer"]["dim_to_name"].values())


def _check_unscaled(model_trace: dict) -> None:
    """Refuse a scale other than 1 on a site of an enumerated ``scan``."""
    for name, site in model_trace.items():
        if site["type"] == "sample" and _scanned(site) and site["scale"] is not None:
            if isinstance(site["scale"], jax.core.Tracer) or float(site["scale"]) != 1.0:
                raise EnumerationError(enumerated_scan_message(name.removeprefix("_PREV_")))


def _log_prob(site: dict) -> jax.Array:
    if site["intermediates"]:
        return site["fn"].log_prob(site["value"], site["intermediates"])
    return site["fn"].log_prob(site["value"])


def _scaled(site: dict, log_prob: jax.Array) -> jax.Array:
    return log_prob if site["scale"] is None else site["scale"] * log_prob


def _common_scale(scales: list, names: list[str]) -> Any:
    """The one scale of the sites summed out together (refused when they differ)."""
    found = [1.0 if scale is None else scale for scale in scales]
    if any(jnp.ndim(scale) for scale in found):
        raise EnumerationError(enumeration_scale_message(names, "numpyro"))
    # A traced scale (handlers.scale under jit) is compared by identity.
    if len({id(s) if isinstance(s, jax.core.Tracer) else float(s) for s in found}) != 1:
        raise EnumerationError(enumeration_scale_message(names, "numpyro"))
    return found[0]
