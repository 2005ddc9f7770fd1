"""GELU (exact, erf form) that stays fast for the few rows of a decoding step.

PyTorch sends exact GELU on every contiguous float32 or bfloat16 CPU tensor of two or more
elements to oneDNN, whose per-call set-up is most of the time for a few rows: a one-token
GELU of width 512 takes oneDNN 2.5-3x the time of PyTorch's own kernel, and a cached
decoding step of moa_metric calls 13. At training sizes oneDNN is the faster (1.7x at
4096 x 512), so `gelu` switches oneDNN off only for inputs of at most `NATIVE_MAX_NUMEL`
elements, about where the two cost the same on one or two threads (`bench/gelu.py`,
docs/benchmarks.md). Both compute `x * Phi(x)` to float32 rounding; the backward is
PyTorch's either way.

oneDNN's switch is process-wide: `OneDNNOff` turns it off for the one call and restores it
after, even on an error. An op that another thread runs in that window takes PyTorch's
kernel, which computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NATIVE_MAX_NUMEL = 16384


class OneDNNOff:
    """Within it, PyTorch's CPU ops take their own kernels, not oneDNN's; the switch is
    restored on leaving. About a microsecond to enter and leave."""

    def __enter__(self) -> None:
        self.before = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False

    def __exit__(self, *exception: object) -> None:
        torch.backends.mkldnn.enabled = self.before


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU of x (any shape): `F.gelu(x)`, on PyTorch's kernel where x is small."""
    if x.numel() > NATIVE_MAX_NUMEL or x.device.type != "cpu":
        return F.gelu(x)
    with OneDNNOff():
        return F.gelu(x)


class GELU(nn.Module):
    """`gelu` as a module, for `nn.Sequential`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)
