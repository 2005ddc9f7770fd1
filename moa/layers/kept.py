"""Values computed from a module's parameters, kept between calls while nothing changes.

A decoding step runs without autograd on the weights of the step before, yet would
recompute what depends on the parameters alone (metric attention's alpha and Mahalanobis
scales) or on them and the positions that every layer of a forward shares (BlackHoleRoPE's
tables). `KeptValues` keeps such a value under a name and computes it again when a
parameter changes (a load, a move, an in-place write: its storage or its version counter),
after any optimizer step in the process, or when the `given` input is another tensor
object. Optimizer steps are counted apart because a fused one (`torch.optim.AdamW(fused=
True)`, moa's default) writes the parameters without bumping their version counters.
With autograd every call computes, so that no kept value carries one forward's graph into
another; except within `one_forward()`, around one forward of a model, where its layers
share one value and one graph (the value's gradient is then the sum of theirs), dropped
when the forward ends.

Under torch.compile nothing is kept: every call computes and `one_forward()` is no block.
The compiler keeps what it can by itself. The checks (storage pointers, version counters)
would break the graph, and a break inside a `with` block makes dynamo run the rest of the
model's forward uncompiled. In PyTorch 2.13 the graphs split there also failed to load
from a warm compile cache (`RuntimeError: invalid shape dimension` replaying a view).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

_optimizer_steps = [0]  # optimizer steps taken in this process, by any optimizer


def _count_optimizer_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class KeptValues:
    def __init__(self) -> None:
        self.values: dict[str, tuple] = {}  # name -> (given, parameters' state, value)
        self.in_one_forward = False

    def one_forward(self) -> AbstractContextManager[None]:
        """Keep values with autograd too until the end of the block: one forward's."""
        return nullcontext() if torch.compiler.is_compiling() else self._one_forward()

    @contextmanager
    def _one_forward(self) -> Iterator[None]:
        self.in_one_forward = True
        try:
            yield
        finally:
            self.in_one_forward = False
            self.values.clear()

    def get(self, name: str, parameters: Iterable[torch.Tensor], compute: Callable[[], Any],
            given: torch.Tensor | None = None) -> Any:
        """compute(), or the value it gave while `parameters` and `given` stand."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and not self.in_one_forward):
            return compute()
        state = (_optimizer_steps[0], *((p.data_ptr(), 0 if p.is_inference() else p._version)
                                        for p in parameters))  # inference tensors: no version
        kept = self.values.get(name)
        if kept is None or kept[0] is not given or kept[1] != state:
            kept = self.values[name] = (given, state, compute())
        return kept[2]
