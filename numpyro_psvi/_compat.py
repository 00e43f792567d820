"""Every use of a private NumPyro internal, in one place.

Tested with the NumPyro versions that ``pyproject.toml`` allows; a NumPyro release
that renames one of these breaks only this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from numpyro.infer.autoguide import AutoBatchedMixin, AutoContinuous, AutoNormal
from numpyro.infer.util import _unconstrain_reparam


def unconstrain_reparam(params: dict[str, jax.Array], site: dict) -> Any:
    """NumPyro's substitute function for unconstrained site values: the constrained
    value, with ``log|det J|`` added to the trace (as ``potential_energy`` does)."""
    return _unconstrain_reparam(params, site)


def autonormal_init_locs(guide: AutoNormal) -> dict[str, jax.Array]:
    """AutoNormal's initial unconstrained locations by site, in its param order."""
    return guide._init_locs


def autonormal_event_dims(guide: AutoNormal) -> dict[str, int]:
    """AutoNormal's event dimensions of each site's unconstrained value."""
    return guide._event_dims


def batched_event_size(guide: AutoBatchedMixin) -> int:
    """The size ``d`` of each block of a batched autoguide (its latent is ``(*batch, d)``)."""
    return guide._event_shape[0]


def unpack_latent(guide: AutoContinuous) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """An AutoContinuous guide's map from its flat latent to unconstrained site values."""
    return guide._unpack_latent
