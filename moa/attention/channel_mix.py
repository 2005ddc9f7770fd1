"""Channel mix: a per-token MLP, `Linear(C, mixer_hidden) -> GELU -> Linear(mixer_hidden, C)`.

Nothing crosses positions, so it is trivially causal and needs no cache. As a path of a
mixture (`moa/attention/mixture.py`) the whole MLP is its `token_part`: under top-k
routing it runs only on the tokens routed to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moa.attention.registry import ATTENTION
from moa.layers.activation import gelu
from moa.layers.context import select_positions
from moa.layers.residual import Dropout
from moa.schema import check, check_range

if TYPE_CHECKING:
    from moa.config import ModelConfig
    from moa.layers.context import ForwardContext


@dataclass
class ChannelMixConfig:
    name: str = "channel_mix"
    mixer_hidden: int | None = None  # None: 2 * d_model
    dropout: float = 0.0  # on the output
    bias: bool = False

    def __post_init__(self) -> None:
        check(self.mixer_hidden is None or self.mixer_hidden > 0, "mixer_hidden",
              self.mixer_hidden, "a positive integer, or null for 2 * d_model")
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)


@ATTENTION.register("channel_mix", ChannelMixConfig)
class ChannelMix(nn.Module):
    computes_output_positions = True  # each token alone: those positions only, when given

    def __init__(self, config: ChannelMixConfig, model: ModelConfig) -> None:
        super().__init__()
        hidden = config.mixer_hidden or 2 * model.d_model
        self.up = nn.Linear(model.d_model, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, model.d_model, bias=config.bias)
        self.down.residual = True  # scaled at init as a residual-stream projection
        self.dropout = Dropout(config.dropout)

    def sequence_part(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x  # (B, T, C): nothing to do across positions

    def token_part(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., C) -> (..., C), each row alone."""
        return self.dropout(self.down(gelu(self.up(h))))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), position by position; (B, K, C) at ctx.output_positions."""
        if ctx.output_positions is not None:
            x = select_positions(x, ctx.output_positions)
        return self.token_part(x)
