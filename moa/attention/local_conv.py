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
from moa.kernels.causal_conv import depthwise_causal_conv
from moa.schema import check

if TYPE_CHECKING:
    from moa.config import ModelConfig
    from moa.layers.context import ForwardContext
    from moa.layers.kv_cache import LayerCache


@dataclass
class LocalConvConfig:
    name: str = "local_conv"
    conv_kernel: int = 4  # positions each output sees: itself and the previous conv_kernel - 1
    bias: bool = False

    def __post_init__(self) -> None:
        check(self.conv_kernel > 0, "conv_kernel", self.conv_kernel, "a positive integer")


class CausalDepthwiseConv(nn.Conv1d):
    """Each of `channels` convolved with its own kernel over the last `kernel` positions
    (`moa/kernels/causal_conv.py`: on CPU a kernel of ours, in the (B, T, C) layout); with
    a cache, the last `kernel - 1` inputs roll in `cache.state["conv"]` (B, K - 1, C).
    Also the HyperFFN's conv branch (`moa/layers/hyper_ffn.py`)."""

    def __init__(self, channels: int, kernel: int, bias: bool) -> None:
        super().__init__(channels, channels, kernel, groups=channels, bias=bias)
        self.history = kernel - 1

    def forward(self, x: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), the cached inputs first."""
        weight = self.weight[:, 0]  # (C, K)
        if cache is None:
            y = depthwise_causal_conv(x, weight)
        else:
            past = cache.state.get("conv")
            if past is None:
                past = x.new_zeros(x.size(0), self.history, x.size(2))
            window = torch.cat((past, x), dim=1)  # (B, K - 1 + T, C)
            cache.state["conv"] = window[:, window.size(1) - self.history:]
            if x.size(1) == 1:  # a decoding step: one dot product per channel
                y = (window * weight.t()).sum(1, keepdim=True)
            else:
                y = depthwise_causal_conv(window, weight, self.history)
        return y if self.bias is None else y + self.bias


@ATTENTION.register("local_conv", LocalConvConfig)
class LocalConv(nn.Module):
    def __init__(self, config: LocalConvConfig, model: ModelConfig) -> None:
        super().__init__()
        C = model.d_model
        self.depthwise = CausalDepthwiseConv(C, config.conv_kernel, config.bias)
        self.pointwise = nn.Linear(C, C, bias=config.bias)
        self.pointwise.residual = True  # scaled at init as a residual-stream projection

    def sequence_part(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> depthwise causal convolution (B, T, C), the cached inputs first."""
        return self.depthwise(x, ctx.cache)

    def token_part(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., C) -> (..., C), each row alone."""
        return self.pointwise(h)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); causal, continuing the cached window."""
        return self.token_part(self.sequence_part(x, ctx))
