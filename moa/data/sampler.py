"""The training order: a function of (seed, epoch), able to resume mid-epoch.

torch's DistributedSampler already draws its permutation from `seed + epoch` and splits it
across ranks (one rank without a process group). Lightning calls `set_epoch` every epoch and
keeps a DistributedSampler as it is under DDP. What this adds is the start: after
`resume_at(epoch, batches)` the iteration of that epoch skips the batches already consumed,
so a resumed run sees the same batches, in the same order, as an uninterrupted one. Its
length stays the whole epoch's: Lightning counts the consumed batches itself.

`ResumableLoader` is the train DataLoader that carries that position through checkpoints,
through Lightning's interface for stateful loaders: Lightning saves its `state_dict` with
the fit loop and, on resume, loads it into the new loader before the first batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


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
        self.set_epoch(epoch)
        self._resume = (epoch, batches)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] * self.batch_size:]
            self._resume = None
        return iter(indices)


class ResumableLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` whose state is where training stands in it.

    `position()` gives (epoch, batches consumed): the training loop's count, since this
    loader's own iterator runs ahead of it by the batches Lightning prefetches.
    """

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler,
                 position: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.position()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume_at(state_dict["epoch"], state_dict["batches"])
