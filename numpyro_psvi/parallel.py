"""Data-parallel scores over JAX devices (docs/data_parallel.md).

As ``pyro_psvi.parallel``, over a one-axis :class:`jax.sharding.Mesh` instead of a
process group: inside ``jax.shard_map`` every device draws the same ``S`` particles
(the same key), :class:`ShardedPlates` gives it its share of the global mini-batch a
plate draws (``subsample_size`` is one device's batch, the global batch ``R`` times
it), and ``lax.pmean`` averages the devices' log joints and scores (a diagonal
Gaussian guide: two per-coordinate sums) into the one-device value on the global
batch. Outside ``shard_map`` the update runs replicated, the same on every device, so
every device accepts or rejects the same update. Across hosts the mesh spans the
devices of every process after ``jax.distributed.initialize()``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax
from jax.sharding import Mesh
from numpyro.primitives import Messenger

from psvi.checks import check_global_batch


class ShardedPlates(Messenger):
    """Draw each mini-batch for the ``world_size`` devices of mesh axis ``axis_name``
    and keep this device's contiguous share (use inside ``jax.shard_map``).

    A plate's ``subsample_size`` ``B`` is one device's batch: the plate draws the
    global batch of ``world_size * B`` indices with its own key, exactly as one device
    with that ``subsample_size`` draws it, and keeps the device's share; indices that
    an outer handler sets (the engine's reshuffled batch, :mod:`numpyro_psvi.batches`)
    are the global batch and are split the same way. A plate without
    ``subsample_size``, or whose indices an inner handler already set, is not split.
    """

    def __init__(self, fn: Callable | None = None, *, axis_name: str, world_size: int) -> None:
        self.axis_name = axis_name
        self.world_size = world_size
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] != "plate" or msg["value"] is not None:
            return
        size, subsample_size = msg["args"][:2]
        check_global_batch(msg["name"], size, subsample_size, self.world_size, "device")
        msg["args"] = (size, self.world_size * subsample_size, *msg["args"][2:])
        msg["infer"] = {**msg.get("infer", {}), "_psvi_device_batch": subsample_size}

    def postprocess_message(self, msg: dict) -> None:
        if msg["type"] != "plate" or "_psvi_device_batch" not in msg.get("infer", {}):
            return
        subsample_size = msg["infer"].pop("_psvi_device_batch")
        start = lax.axis_index(self.axis_name) * subsample_size
        msg["value"] = lax.dynamic_slice_in_dim(msg["value"], start, subsample_size)
        msg["args"] = (msg["args"][0], subsample_size, *msg["args"][2:])


def resolve_mesh(data_parallel: bool | Mesh | None) -> Mesh | None:
    """The engine's mesh: ``None`` fits on one device.

    ``None`` is on (a mesh over ``jax.devices()``) in a multi-process run
    (``jax.process_count() > 1``), where every process would otherwise fit the same
    model alone; ``True`` is a mesh over ``jax.devices()``; a one-axis ``Mesh`` is used
    as given.
    """
    if isinstance(data_parallel, Mesh):
        if len(data_parallel.axis_names) != 1:
            raise ValueError(
                f"data_parallel takes a one-axis Mesh (the data axis), got axes "
                f"{data_parallel.axis_names}; e.g. Mesh(jax.devices(), ('data',))."
            )
        return data_parallel
    if data_parallel is None:
        data_parallel = jax.process_count() > 1
    return Mesh(jax.devices(), ("data",)) if data_parallel else None
