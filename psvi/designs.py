"""Orthogonal particle designs for diagonal Gaussian guides with local latents (backend-free).

With local latents in a subsampled plate, a global's score at each particle carries the
particle deviations of every local in the batch, times ``N/B``: one update's curvature
estimate of the global (``cross / spread``, docs/algorithm.md) is then mostly that noise
(its sd 2.7x its mean on crossed random effects), and fitting the precision only where the
estimate is positive leaves the global's sd 22-33% short (docs/minibatch.md section 16).
The design removes that noise at its source: across the ``S`` particles, the deviations of
the globals and those of each local *slot* (one coordinate of every member of a subsampled
plate, e.g. ``a_i`` for all ``i``) are orthogonal columns of a Hadamard matrix, so in a
log joint that is quadratic a coordinate's ``cross`` sees none of another block's
deviations. The members of a slot need no more than one column between them: the log
joint is a sum over a subsampled plate's members, so no two members' coordinates are
coupled. Each particle is still an exact draw of ``q_t`` (every coordinate a unit-variance
combination of independent normals), and each block's particles average to ``q_t``'s mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class OrthogonalDesign(NamedTuple):
    """``S = groups * group_size`` particles' deviations, in units of the guide's sds:
    ``eps[g, p, d] = sum_c columns[p, c] * weights[c, d] * z[g, c, d]`` with ``z`` standard
    normal, ``(groups, group_size - 1, D)``.

    Attributes
    ----------
    group_size : int
        ``P``, a power of two; the design's particles come in groups of ``P``.
    columns : numpy.ndarray
        ``(P, P - 1)``: the centred columns of the Sylvester-Hadamard matrix of order ``P``
        (entries +-1, mutually orthogonal, each summing to 0).
    weights : numpy.ndarray
        ``(P - 1, D)``: ``1 / sqrt(k)`` where column ``c`` is one of the ``k`` columns of
        coordinate ``d``'s block, else 0, so that every particle's coordinate has unit
        variance.
    """

    group_size: int
    columns: np.ndarray
    weights: np.ndarray


def coordinate_blocks(layout: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> np.ndarray:
    """``(D,)`` int: each flat coordinate's block, ``0`` for the globals and ``1, 2, ...``
    for each local slot. ``layout``: per site in the flat layout's order, its shape and
    the axes (negative) of the subsampled plates it sits in (empty: a global site); a
    local site's slots are the entries of its other axes."""
    blocks, next_block = [], 1
    for shape, plate_axes in layout:
        size = int(np.prod(shape, dtype=np.int64))
        if not plate_axes:
            blocks.append(np.zeros(size, np.int64))
            continue
        axes = [axis % len(shape) for axis in plate_axes]
        slot_shape = [1 if axis in axes else n for axis, n in enumerate(shape)]
        slots = np.arange(int(np.prod(slot_shape, dtype=np.int64))).reshape(slot_shape)
        blocks.append(next_block + np.broadcast_to(slots, shape).ravel())
        next_block += slots.size
    return np.concatenate(blocks) if blocks else np.zeros(0, np.int64)


def design_group_size(blocks: np.ndarray) -> int | None:
    """The smallest Sylvester order ``P >= 4`` whose ``P - 1`` centred columns give each
    local slot one and the globals at least one; ``None`` with fewer than two blocks
    (nothing to keep apart). The smallest order gives each local slot the most columns
    over ``S`` particles (one per group of ``P``)."""
    num_slots = int(blocks.max(initial=0))
    needed = num_slots + bool(np.any(blocks == 0))
    if needed < 2:
        return None
    size = 4
    while size - 1 < needed:
        size *= 2
    return size


def orthogonal_design(blocks: np.ndarray, num_particles: int) -> OrthogonalDesign | None:
    """The :class:`OrthogonalDesign` of ``num_particles`` for the coordinates' ``blocks``
    (:func:`coordinate_blocks`); ``None`` where there is nothing to keep apart or
    ``num_particles`` is not a multiple of :func:`design_group_size`. Local slot ``k``
    takes column ``k - 1``; the globals take every column left."""
    size = design_group_size(blocks)
    if size is None or num_particles % size:
        return None
    hadamard = np.ones((1, 1))
    while hadamard.shape[0] < size:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    num_slots = int(blocks.max(initial=0))
    weights = np.zeros((size - 1, blocks.size))
    is_local = blocks > 0
    weights[blocks[is_local] - 1, np.nonzero(is_local)[0]] = 1.0
    if not is_local.all():
        weights[num_slots:, ~is_local] = (size - 1 - num_slots) ** -0.5
    return OrthogonalDesign(size, hadamard[:, 1:], weights)


def resolve_orthogonal(requested: bool | None, design: OrthogonalDesign | None) -> OrthogonalDesign | None:
    """The design an engine draws its particles from: ``design`` unless the user's
    ``orthogonal_particles`` is ``False`` (``None``: on wherever there is one). Raise naming
    the fix when it is requested where there is none."""
    if requested and design is None:
        raise ValueError(
            "orthogonal_particles=True draws a diagonal Gaussian guide's particles so that its "
            "globals and each local slot of a subsampled plate move in orthogonal directions: it "
            "needs AutoNormal (or an AutoGuideList of AutoNormal parts) on a model with local "
            "latents in a subsampled plate, and num_particles a multiple of the design's "
            "group size (4 for up to three blocks, then 8, 16, ...). Leave it unset otherwise."
        )
    return design if requested is not False else None
