"""The training sampler: an order that is a function of (seed, epoch), able to resume mid-epoch.

torch's DistributedSampler already draws its permutation from `seed + epoch` and splits it
across ranks (one rank without a process group). Lightning calls `set_epoch` every epoch and
keeps a DistributedSampler as it is under DDP. What this adds is the start: after
`resume_at(epoch, batches)` the iteration of that epoch skips the batches already consumed,
so a resumed run sees the same batches, in the same order, as an uninterrupted one. Its
length stays the whole epoch's: Lightning counts the consumed batches itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset: Dataset, seed: int, batch_size: int) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size = batch_size
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start epoch `epoch` after its first `batches` batches (of this rank)."""
        self._resume = (epoch, batches)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] * self.batch_size:]
            self._resume = None
        return iter(indices)
