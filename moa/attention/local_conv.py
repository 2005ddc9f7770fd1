"""Local convolution: a depthwise-separable causal 1-D convolution over time.

Each channel is convolved with its own kernel over the last `conv_kernel` positions
(depthwise, `conv_kernel * C` weights), then a pointwise linear map mixes the channels.
Incremental decoding keeps the last `conv_kernel - 1` inputs as a rolling window in the
cache's `state`, so a step costs O(conv_kernel * C + C^2) whatever the context length.

As a path of a mixture (`moa/attention/mixture.py`) the convolution is split in two: the
cheap depthwise part (`sequence_part`) runs for every token, because later tokens read
it, and the pointwise projection (`token_part`, the C^2 cost) only for the routed ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moa.attention.registry import ATTENTION
from moa.schema import check

if TYPE_CHECKING:
    from moa.config import ModelConfig
    from moa.context import ForwardContext


@dataclass
class LocalConvConfig:
    name: str = "local_conv"
    conv_kernel: int = 4  # positions each output sees: itself and the previous conv_kernel - 1
    bias: bool = False

    def __post_init__(self) -> None:
        check(self.conv_kernel > 0, "conv_kernel", self.conv_kernel, "a positive integer")


@ATTENTION.register("local_conv", LocalConvConfig)
class LocalConv(nn.Module):
    def __init__(self, config: LocalConvConfig, model: ModelConfig) -> None:
        super().__init__()
        C = model.d_model
        self.history = config.conv_kernel - 1
        self.depthwise = nn.Conv1d(C, C, config.conv_kernel, groups=C, bias=config.bias)
        self.pointwise = nn.Linear(C, C, bias=config.bias)
        self.pointwise.residual = True  # scaled at init as a residual-stream projection

    def sequence_part(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> depthwise causal convolution (B, T, C), the cached inputs first."""
        x = x.transpose(1, 2)  # (B, C, T)
        past = None if ctx.cache is None else ctx.cache.state.get("conv")
        if past is None:
            past = x.new_zeros(x.size(0), x.size(1), self.history)
        window = torch.cat((past, x), dim=2)  # (B, C, history + T)
        if ctx.cache is not None:
            ctx.cache.state["conv"] = window[:, :, window.size(2) - self.history:]
        return self.depthwise(window).transpose(1, 2)

    def token_part(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., C) -> (..., C), each row alone."""
        return self.pointwise(h)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); causal, continuing the cached window."""
        return self.token_part(self.sequence_part(x, ctx))
