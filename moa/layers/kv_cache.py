"""A preallocated key/value cache for incremental decoding.

Each layer owns a `LayerCache`: named tensors (keys, values, and whatever else a scheme
must remember, such as metric attention's key norms) written in place into buffers sized
for `capacity` positions along the time axis, so a decoding step copies only the new
token's entries. `state` holds non-sequence state (a convolution's rolling window) and
the child caches of a layer's branches (`child`). Besides the layers, the model keeps one
cache for a shared FFN after the stack (`ffn`) and one for the LM head (`head`).
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


class KVCache:
    """Per-layer caches plus the number of positions already consumed."""

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]
        self.ffn = LayerCache(capacity)  # the FFN after the stack (ffn.placement: shared)
        self.head = LayerCache(capacity)  # the LM head's attention (head: moa)
        self.capacity = capacity
        self.length = 0
