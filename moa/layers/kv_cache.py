"""A preallocated key/value cache for incremental decoding.

Each layer owns a `LayerCache`: named tensors (keys, values, and whatever else a scheme
must remember, such as metric attention's key norms) written in place into buffers sized
for `capacity` positions along the time axis, so a decoding step copies only the new
token's entries. `state` holds non-sequence state (a convolution's rolling window), the
child caches of a layer's branches (`child`) and `CompactCache`s (`compact`): rows of
entries of which only some are kept (metric attention's keys inside their balls). Besides
the layers, the model keeps one cache for a shared FFN after the stack (`ffn`) and one for
the LM head (`head`). `held_bytes` counts what a cache holds for the positions it has seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class LayerCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffers: dict[str, torch.Tensor] = {}
        self.lengths: dict[str, int] = {}
        self.state: dict[str, Any] = {}

    def append(self, name: str, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Write `x` after what `name` holds along `dim`; return everything held so far."""
        start = self.lengths.get(name, 0)
        end = start + x.size(dim)
        if end > self.capacity:
            raise ValueError(f"KV cache is full: {end} positions > capacity {self.capacity}")
        if name not in self.buffers:
            shape = list(x.shape)
            shape[dim] = self.capacity
            self.buffers[name] = x.new_empty(shape)
        buffer = self.buffers[name]
        buffer.narrow(dim, start, x.size(dim)).copy_(x)
        self.lengths[name] = end
        return buffer.narrow(dim, 0, end)

    def kept(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()` on the first call, the same value after it: what is projected once
        per cache, such as the keys and values of a memory that cross-attention reads."""
        if name not in self.state:
            self.state[name] = compute()
        return self.state[name]

    def child(self, name: str) -> LayerCache:
        """The cache of the branch `name` (a mixture's path, the FFN), kept in `state`."""
        if name not in self.state:
            self.state[name] = LayerCache(self.capacity)
        return self.state[name]

    def compact(self, name: str) -> CompactCache:
        """The `CompactCache` `name`, kept in `state`."""
        return self.kept(name, lambda: CompactCache(self.capacity))

    def held_bytes(self) -> int:
        """Bytes of the positions written so far, in every buffer, child and compact cache
        (the free room of a preallocated buffer is not counted)."""
        total = sum(buffer.nbytes // self.capacity * self.lengths[name]
                    for name, buffer in self.buffers.items())
        for value in self.state.values():
            if isinstance(value, (LayerCache, CompactCache)):
                total += value.held_bytes()
        return total


class CompactCache:
    """Rows of entries (keys, values, ...) of which a mask keeps some, compacted per row.

    Entries are (B, H, T, ...) tensors, a row being one (batch, head) pair. Each row holds
    its kept entries in order in the first `counts[b, h]` slots of buffers (B, H, slots,
    ...); `length` is the longest row (a host integer), and the slots between a row's count
    and `length` are padding, masked by `valid()`. The buffers are as long as the rows need
    (growing by doubling, up to `capacity`), so the bytes held follow the kept fraction
    rather than the positions seen.

    `stage` writes the T new entries of a call, all of them, right after `length`, and
    returns the held rows followed by them: (B, H, length + T, ...), in place, without a
    copy of what is held. `commit` then keeps the new entries that its mask keeps, moved
    down to their rows' counts, and drops the others."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffers: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None  # (B, H) kept entries per row
        self.length = 0  # max of counts: the padded length of the held rows
        self.staged = 0  # entries staged after `length` by the last `stage`

    def stage(self, entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """entries name -> (B, H, T, ...) -> name -> (B, H, length + T, ...): the held rows,
        padded to `length`, then the new entries."""
        T = next(iter(entries.values())).size(2)
        for name, x in entries.items():
            self._reserve(name, x, self.length + T)
            self.buffers[name].narrow(2, self.length, T).copy_(x)
        if self.counts is None:
            first = next(iter(entries.values()))
            self.counts = torch.zeros(first.shape[:2], dtype=torch.long, device=first.device)
        self.staged = T
        return {name: buffer.narrow(2, 0, self.length + T) for name, buffer in self.buffers.items()}

    def valid(self) -> torch.Tensor:
        """(B, H, length) True on the slots that hold a kept entry, False on padding."""
        slots = torch.arange(self.length, device=self.counts.device)
        return slots < self.counts[..., None]

    def commit(self, keep: torch.Tensor) -> None:
        """keep (B, H, T), bool over the staged entries: those kept join their rows."""
        T = self.staged
        # kept entries first, in order; then the dropped ones, which land on padding
        slots = self.counts[..., None]  # (B, H, 1): a row's next slot
        order = None
        if T > 1:
            slots = slots + torch.arange(T, device=keep.device)  # (B, H, T)
            order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
        for buffer in self.buffers.values():
            new = buffer.narrow(2, self.length, T)
            tail = (1,) * (buffer.dim() - 3)
            # one entry is its own order (a copy: scatter_ cannot read what it writes)
            moved = new.clone() if order is None else new.gather(
                2, order.view(*order.shape, *tail).expand_as(new))
            buffer.scatter_(2, slots.view(*slots.shape, *tail).expand_as(moved), moved)
        self.counts = self.counts + keep.sum(-1)
        self.length = int(self.counts.max())  # the one host sync: the rows' padded length
        self.staged = 0

    def held_bytes(self) -> int:
        """Bytes of the held rows: `length` slots (padding included) per row."""
        return sum(buffer.nbytes // buffer.size(2) * self.length
                   for buffer in self.buffers.values())

    def _reserve(self, name: str, x: torch.Tensor, slots: int) -> None:
        """Make the buffer of `name` at least `slots` long, zero-padded (padding is read by
        the kernels with weight 0, so it must be finite)."""
        buffer = self.buffers.get(name)
        if buffer is not None and buffer.size(2) >= slots:
            return
        if slots > self.capacity:
            raise ValueError(f"KV cache is full: {slots} positions > capacity {self.capacity}")
        size = min(self.capacity, max(slots, 2 * (0 if buffer is None else buffer.size(2))))
        grown = x.new_zeros(*x.shape[:2], size, *x.shape[3:])
        if buffer is not None:
            grown.narrow(2, 0, self.length).copy_(buffer.narrow(2, 0, self.length))
        self.buffers[name] = grown


class KVCache:
    """Per-layer caches plus the number of positions already consumed."""

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]
        self.ffn = LayerCache(capacity)  # the FFN after the stack (ffn.placement: shared)
        self.head = LayerCache(capacity)  # the LM head's attention (head: moa)
        self.capacity = capacity
        self.length = 0

    def held_bytes(self) -> int:
        """Bytes held for the positions seen, over the layers, the shared FFN and the head."""
        return sum(cache.held_bytes() for cache in (*self.layers, self.ffn, self.head))
