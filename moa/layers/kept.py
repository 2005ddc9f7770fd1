"""Values computed from a module's parameters, kept between calls while nothing changes.

A decoding step runs without autograd on the weights of the step before, yet would
recompute what depends on the parameters alone (metric attention's alpha and Mahalanobis
scales) or on them and the positions that every layer of a forward shares (BlackHoleRoPE's
tables). `KeptValues` keeps such a value under a name and computes it again when a
parameter changes (an optimizer step, a load, a move: its storage or its version counter)
or when the `given` input is another tensor object. With autograd every call computes, so
that no kept value carries one forward's graph into another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class KeptValues:
    def __init__(self) -> None:
        self.values: dict[str, tuple] = {}  # name -> (given, parameters' state, value)

    def get(self, name: str, parameters: Iterable[torch.Tensor], compute: Callable[[], Any],
            given: torch.Tensor | None = None) -> Any:
        """compute(), or the value it gave while `parameters` and `given` stand."""
        if torch.is_grad_enabled():
            return compute()
        state = tuple((p.data_ptr(), 0 if p.is_inference() else p._version)  # inference
                      for p in parameters)  # tensors keep no version counter
        kept = self.values.get(name)
        if kept is None or kept[0] is not given or kept[1] != state:
            kept = self.values[name] = (given, state, compute())
        return kept[2]
