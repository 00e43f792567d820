"""Mini-batches by random reshuffling (docs/minibatch.md section 9).

A subsampled plate (``pyro.plate(name, N, subsample_size=B)``) draws each mini-batch
independently. With ``reshuffle=True`` (the engines' default) the engine draws the
batches as a ``DataLoader(shuffle=True, drop_last=True)`` does instead: consecutive
slices of one random permutation of the plate's ``N`` members, a new permutation once
fewer than ``B`` members are left. Each batch is still a uniform random subset of size
``B`` (so the plate's ``N/B`` scale stays unbiased), but within an epoch every member is
seen once, so the batch noise of the updates in an epoch sums to (nearly) zero at a
fixed guide: averaged iterates converge far faster than with independent batches.

:class:`EpochOrder` is part of the engine's state (and of its checkpoints);
:class:`~pyro_psvi.parallel.ShardedPlates` draws the plates' batches from it.
:class:`SharedSubsample` makes every pass of one step (the guide's draws, the model's
scores) see the step's one batch.
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger

from pyro_psvi._compat import Subsample


class EpochOrder:
    """Where each subsampled plate is in its epoch.

    Attributes
    ----------
    permutations : dict
        ``{plate name: (N,) int64}``: this epoch's order of the plate's members.
    positions : dict
        ``{plate name: int}``: where the next batch starts in it.
    """

    def __init__(self) -> None:
        self.permutations: dict[str, torch.Tensor] = {}
        self.positions: dict[str, int] = {}

    def next(self, name: str, size: int, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """Plate ``name``'s next ``batch`` indices on the plate's ``device``: the next
        slice of this epoch's permutation, or the first of a new one (drawn with torch's
        RNG, as the plate draws) when fewer than ``batch`` are left or the plate's size
        changed."""
        permutation, position = self.permutations.get(name), self.positions.get(name, 0)
        if permutation is None or len(permutation) != size or position + batch > size:
            permutation, position = torch.randperm(size, device=device), 0
            self.permutations[name] = permutation
        elif device is not None and permutation.device != torch.device(device):
            permutation = self.permutations[name] = permutation.to(device)  # e.g. restored elsewhere
        self.positions[name] = position + batch
        return permutation[position : position + batch]

    def state_dict(self) -> dict:
        """The order as plain tensors and ints (for a checkpoint)."""
        return {"permutations": dict(self.permutations), "positions": dict(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s order."""
        self.permutations = dict(state["permutations"])
        self.positions = {name: int(position) for name, position in state["positions"].items()}


class SharedSubsample(Messenger):
    """Draw each subsampled plate's indices once and replay them on later passes.

    Parameters
    ----------
    indices : dict
        Filled with ``{plate name: indices}`` on first use; pass the same dict to
        every pass that must see the same mini-batch.
    """

    def __init__(self, indices: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.indices = indices

    def _pyro_sample(self, msg) -> None:
        if isinstance(msg["fn"], Subsample) and msg["value"] is None:
            msg["value"] = self.indices.get(msg["name"])

    def _pyro_post_sample(self, msg) -> None:
        if isinstance(msg["fn"], Subsample):
            self.indices.setdefault(msg["name"], msg["value"])
