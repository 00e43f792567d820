"""Data-parallel scores over ``torch.distributed`` (docs/data_parallel.md).

Every rank holds the same guide and draws the same ``S`` particles (the same seed on
every rank). A model's ``pyro.plate(..., subsample_size=B)`` gives each of the ``R``
ranks ``B`` data points, as ``DistributedDataParallel`` gives each a ``DataLoader``
batch: :class:`ShardedPlates` draws the global batch of ``R B`` indices, the same on
every rank, and keeps the rank's share, which the plate scales by ``N / B`` as a batch
of its own. The mean of the ranks' log joints and scores is then the one-process value
on the global batch: averaging the data terms ``(N/B) sum_{share}`` gives
``(N/(R B)) sum_{batch}``, and the prior and Jacobian, the same on every rank, are
counted once. :class:`ScoreReducer` takes that mean in one all-reduce; a diagonal
Gaussian guide reduces two per-coordinate sums instead of the ``(S, D)`` scores.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger

from psvi.checks import check_global_batch
from pyro_psvi._compat import Subsample
from pyro_psvi.batches import EpochOrder

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for the others in an all-reduce


class RankFailedError(RuntimeError):
    """Another rank failed in its score phase: the update was abandoned on every rank."""


class ShardedPlates(Messenger):
    """Draw each mini-batch for all ``world_size`` ranks and keep rank ``rank``'s share.

    A plate's ``subsample_size`` is the batch of one rank, as a ``DataLoader``'s
    ``batch_size`` under ``DistributedDataParallel``: the plate draws the global batch of
    ``world_size * subsample_size`` indices, exactly as one process with that
    ``subsample_size`` draws it (the same random numbers), and the rank keeps its
    contiguous share. With an ``order`` (:class:`~pyro_psvi.batches.EpochOrder`) the
    global batch is its next one instead (random reshuffling; one rank included).
    Indices the model passes itself (``subsample=``, e.g. from a
    ``DistributedSampler``) are the rank's own batch and are left as they are. Use it
    outside :class:`~pyro_psvi.batches.SharedSubsample`, which then replays the share.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, order: EpochOrder | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.order = order

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if not isinstance(fn, Subsample) or msg["value"] is not None or fn.subsample_size is None:
            return
        check_global_batch(msg["name"], fn.size, fn.subsample_size, self.world_size, "rank")
        batch = self.world_size * fn.subsample_size
        if self.order is not None:
            indices = self.order.next(msg["name"], fn.size, batch, fn.device)
        else:
            indices = Subsample(fn.size, batch, device=fn.device).sample()
        msg["value"] = indices.chunk(self.world_size)[self.rank]


class ScoreReducer:
    """Averages score tensors over the ranks of a ``torch.distributed`` process group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The ranks to average over (the default group when omitted).
    timeout : float
        Seconds to wait for the other ranks in an all-reduce before raising
        :class:`TimeoutError`.

    Attributes
    ----------
    floats_reduced : int
        Floats this rank has all-reduced in its updates so far (the benchmark's
        communication volume; the set-up check is not counted).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "data_parallel=True needs an initialized torch.distributed process group: "
                "start the script with torchrun and call "
                "torch.distributed.init_process_group() before the first step."
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = float(timeout)
        self.floats_reduced = 0

    def mean(self, tensors: Sequence[torch.Tensor], *, failed: bool = False) -> list[torch.Tensor]:
        """The mean of each tensor over the ranks, in one all-reduce.

        A rank whose score phase raised calls this with ``failed=True`` (its tensors only
        give the shapes): every rank then raises :class:`RankFailedError` instead of
        waiting for it.
        """
        reference = tensors[0]
        flat = torch.cat(
            [torch.full((1,), float(failed), dtype=reference.dtype, device=reference.device)]
            + [t.detach().reshape(-1).to(reference.dtype) for t in tensors]
        )
        self._all_reduce(flat)
        self.floats_reduced += flat.numel()
        if bool(flat[0] > 0) and not failed:
            raise RankFailedError(
                f"{int(flat[0])} of the {self.world_size} ranks failed in their score phase "
                "(see their errors); this update was abandoned on every rank, so each engine "
                "stays at its last completed step."
            )
        values = (flat[1:] / self.world_size).split([t.numel() for t in tensors])
        return [value.reshape(t.shape).to(t.dtype) for value, t in zip(values, tensors, strict=True)]

    def agree(self, flag: torch.Tensor) -> torch.Tensor:
        """Whether ``flag`` (a 0-dim bool) holds on every rank."""
        votes = (~flag).to(torch.float32).reshape(1)
        self._all_reduce(votes)
        self.floats_reduced += 1
        return votes[0] == 0

    def check_same(self, tensors: Sequence[torch.Tensor], what: str, fix: str) -> None:
        """Raise ``ValueError`` unless ``tensors`` hold the same values on every rank."""
        device = tensors[0].device
        checksum = torch.stack([t.detach().double().sum().to(device) for t in tensors])
        low, high = checksum.clone(), checksum.clone()
        self._all_reduce(low, dist.ReduceOp.MIN)
        self._all_reduce(high, dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise ValueError(f"Data-parallel fitting needs {what} on every rank, and they differ. {fix}")

    def _all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as error:
            raise TimeoutError(
                f"Rank {self.rank} got no answer from the other {self.world_size - 1} ranks in "
                f"an all-reduce of the scores within {self.timeout:g} s ({error}). A rank has "
                "probably stopped or hangs (an error or an interrupt outside the score phase); "
                "restart all ranks from the last checkpoint."
            ) from error
