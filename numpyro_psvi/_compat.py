"""Every use of a private NumPyro internal, in one place.

Tested with the NumPyro versions that ``pyproject.toml`` allows; a NumPyro release
that renames one of these breaks only this module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
from jax.example_libraries.optimizers import OptimizerState

try:  # a jaxpr's literal constants
    from jax.extend.core import Literal as JaxprLiteral
except ImportError:  # JAX before jax.extend.core
    from jax.core import Literal as JaxprLiteral
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.infer.autoguide import AutoBatchedMixin, AutoContinuous, AutoNormal

from numpyro_psvi.jacobians import constrained_value, log_abs_det_jacobian


def unconstrain_reparam(params: dict[str, jax.Array], site: dict) -> Any:
    """NumPyro's substitute function for unconstrained site values
    (``numpyro.infer.util._unconstrain_reparam``, what ``potential_energy`` substitutes,
    mirrored): the constrained value, with ``log|det J|`` added to the trace as a factor,
    the value and ``log|det J|`` from :mod:`numpyro_psvi.jacobians` (inside the support and
    with finite gradients where the transform's own float32 arithmetic fails)."""
    name = site["name"]
    if name not in params:
        return None
    if site["type"] != "sample":
        return params[name]
    unconstrained, support = params[name], site["fn"].support
    transform = biject_to(support)
    # Inside scan a site may take one step's item of a whole sequence (NumPyro's own rule).
    index = site["infer"].get("_scan_current_index", None)
    if index is not None:
        shift = transform.codomain.event_dim - transform.domain.event_dim
        if jnp.ndim(unconstrained) > len(site["fn"].shape()) - shift:
            unconstrained = unconstrained[index]
    if support is constraints.real or (
        isinstance(support, constraints.independent) and support.base_constraint is constraints.real
    ):
        return unconstrained
    value = constrained_value(transform, unconstrained)
    log_det = log_abs_det_jacobian(transform, unconstrained, value)
    log_det = sum_rightmost(log_det, jnp.ndim(log_det) - jnp.ndim(value) + len(site["fn"].event_shape))
    numpyro.factor(f"_{name}_log_det", log_det)
    return value


def param_transforms(constrain_fn: Any) -> dict[str, Any]:
    """``{param name: transform}`` from unconstrained to constrained values, as
    ``SVI.init`` built them (its ``constrain_fn`` is ``partial(transform_fn, transforms)``)."""
    return dict(constrain_fn.args[0])


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


def device_varying(tree: Any, axis_name: str) -> Any:
    """``tree`` marked as varying over the ``shard_map`` axis ``axis_name``, so that a
    gradient in it stays per device (JAX would otherwise sum an invariant input's
    gradient over the devices). ``lax.pcast`` in JAX 0.9+, ``lax.pvary`` before; a
    no-op where ``shard_map`` does not track varying values."""
    if hasattr(jax.lax, "pcast"):
        return jax.tree.map(lambda leaf: jax.lax.pcast(leaf, axis_name, to="varying"), tree)
    if hasattr(jax.lax, "pvary"):
        return jax.lax.pvary(tree, axis_name)
    return tree


def shard_map(fn: Callable, mesh: Any, in_specs: Any, out_specs: Any) -> Callable:
    """``jax.shard_map`` (JAX 0.6+), or ``jax.experimental.shard_map.shard_map`` before."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def with_params(optim_state: Any, params: dict[str, jax.Array]) -> Any:
    """A NumPyro optimizer state ``(step, inner)`` holding ``params`` in place of its own,
    its moments kept. The two layouts of NumPyro's optimizers: jax.example_libraries'
    ``OptimizerState`` (each leaf's packed state leads with its value: ``numpyro.optim``'s
    own) and ``optax_to_numpyro``'s ``(params, optax state)``."""
    step, inner = optim_state
    if isinstance(inner, OptimizerState):
        leaves = inner.tree_def.flatten_up_to(params)
        packed = type(inner.packed_state)(
            type(state)([leaf, *state[1:]]) for leaf, state in zip(leaves, inner.packed_state, strict=True)
        )
        return step, OptimizerState(packed, inner.tree_def, inner.subtree_defs)
    if (
        isinstance(inner, tuple)
        and len(inner) == 2
        and jax.tree.structure(inner[0]) == jax.tree.structure(params)
    ):
        return step, (params, inner[1])
    raise NotImplementedError(
        f"Cannot set the params of an optimizer state of type {type(inner).__name__}: a "
        "user-written guide with local latents needs it (the params its mini-batch does not "
        "read are held). Use a numpyro.optim optimizer or an optax transformation."
    )


def _is_optax_state(inner: Any) -> bool:
    """Whether a NumPyro optimizer's inner state is ``optax_to_numpyro``'s ``(params, optax
    state)``, the params a dict by name."""
    return isinstance(inner, tuple) and len(inner) == 2 and isinstance(inner[0], dict)


def with_entries_of(optim_state: Any, source: Any, names: Collection[str]) -> Any:
    """``optim_state`` with the params ``names`` and their optimizer state (moments,
    traces) as they are in ``source``, a state of the same optimizer; its other entries
    and its step count kept. jax.example_libraries' ``OptimizerState`` (each leaf's packed
    state) and ``optax_to_numpyro``'s ``(params, optax state)``, whose per-param entries
    are the dicts keyed by the params' names (masked ones included, as
    ``optax.multi_transform`` keeps them)."""
    step, inner = optim_state
    _, source_inner = source
    if isinstance(inner, OptimizerState):
        numbered = inner.tree_def.unflatten(range(inner.tree_def.num_leaves))
        chosen = inner.tree_def.flatten_up_to(
            {
                name: jax.tree.map(lambda _, name=name: name in names, value)
                for name, value in numbered.items()
            }
        )
        packed = type(inner.packed_state)(
            theirs if take else own
            for take, own, theirs in zip(chosen, inner.packed_state, source_inner.packed_state, strict=True)
        )
        return step, OptimizerState(packed, inner.tree_def, inner.subtree_defs)
    if _is_optax_state(inner):
        keys = set(inner[0])

        def per_param(node: Any) -> bool:
            return isinstance(node, dict) and set(node) == keys

        def select(own: Any, theirs: Any) -> Any:
            return (
                {key: theirs[key] if key in names else value for key, value in own.items()}
                if per_param(own)
                else own
            )

        return step, jax.tree.map(select, inner, source_inner, is_leaf=per_param)
    raise NotImplementedError(
        f"Cannot hold params in an optimizer state of type {type(inner).__name__}: a model "
        "with numpyro.param sites needs it (they take one optimizer step per update). Use a "
        "numpyro.optim optimizer or an optax transformation."
    )


def with_step_count(optim_state: Any, count: jax.Array | int) -> Any:
    """``optim_state`` as if its optimizer had taken ``count`` steps: the step that
    jax.example_libraries' optimizers pass to their update (Adam's bias correction, a
    ``step_size`` schedule) and, in ``optax_to_numpyro``'s ``(params, optax state)``,
    every optax state's ``count`` field (``scale_by_adam``'s, a schedule's,
    ``inject_hyperparams``'); params and moments kept."""
    step, inner = optim_state
    if isinstance(inner, OptimizerState):
        return jnp.asarray(count, dtype=jnp.result_type(step)), inner
    if _is_optax_state(inner):

        def recount(path: tuple, leaf: Any) -> Any:
            field = path[-1] if path else None
            at_count = isinstance(field, jax.tree_util.GetAttrKey) and field.name == "count"
            return jnp.full_like(leaf, count) if at_count else leaf

        return step, (inner[0], jax.tree_util.tree_map_with_path(recount, inner[1]))
    raise NotImplementedError(
        f"Cannot set the step count of an optimizer state of type {type(inner).__name__}: a "
        "model with numpyro.param sites needs it (their steps count one per update, as under "
        "SVI). Use a numpyro.optim optimizer or an optax transformation."
    )


def is_jaxpr_literal(var: Any) -> bool:
    """Whether an input of a jaxpr equation is a literal constant (not a variable)."""
    return isinstance(var, JaxprLiteral)
