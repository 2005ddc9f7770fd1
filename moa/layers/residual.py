"""What a block does to a branch before adding it to the residual stream.

`LayerScale` (CaiT) multiplies the branch by a learned per-channel scale started small,
so deep stacks begin close to the identity. `DropPath` (stochastic depth) drops the
whole branch for a random subset of the batch's sequences during training, scaling the
kept ones by 1 / (1 - p) so the expectation is unchanged; at eval it is the identity.
`Dropout` is `nn.Dropout` returning its input at once where it does nothing (at eval, or
with p = 0), without `F.dropout`'s call: a MoA decoding step passes through some forty.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, d_model: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((d_model,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return x * self.scale.to(x.dtype)


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (...) -> (...)
        return super().forward(x) if self.training and self.p > 0 else x


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.size(0), *(1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)
