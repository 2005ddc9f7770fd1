"""Feed-forward networks: `mlp` (GELU) | `swiglu` | `hyper` (`moa/layers/hyper_ffn.py`) | `none`.

Every FFN is built as `cls(config, d_model, bias)` and called as `ffn(x, ctx)` with
x: (B, T, C); `ctx` gives it a record scope and its own cache (the HyperFFN's conv branch
keeps a rolling window there). `placement` puts the FFN in every block (`block`) or once
after the stack (`shared`, DiscoverLM's shared HyperFFN; the blocks then have none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moa.layers.activation import gelu
from moa.layers.residual import Dropout
from moa.registry import Registry
from moa.schema import check, check_choice, check_range

if TYPE_CHECKING:
    from moa.layers.context import ForwardContext

FFN: Registry[nn.Module] = Registry("ffn")


@dataclass
class FFNConfig:
    name: str = "mlp"
    hidden_dim: int | None = None  # None: hidden_mult * d_model, rounded up to multiple_of
    hidden_mult: float = 4.0
    multiple_of: int = 64
    dropout: float = 0.0
    placement: str = "block"  # block: in every block | shared: once after the stack

    def __post_init__(self) -> None:
        check_choice("placement", self.placement, ["block", "shared"])
        check(self.hidden_dim is None or self.hidden_dim > 0, "hidden_dim", self.hidden_dim,
              "a positive integer or null")
        check(self.hidden_mult > 0, "hidden_mult", self.hidden_mult, "a positive float")
        check(self.multiple_of > 0, "multiple_of", self.multiple_of, "a positive integer")
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)

    def hidden(self, d_model: int) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        width = int(self.hidden_mult * d_model)
        return -(-width // self.multiple_of) * self.multiple_of


class TokenwiseFFN(nn.Module):
    """An FFN acting on each token alone: all of its work is the subclass's `token_part`,
    so as a routed branch (`moa/layers/branches.py`) it runs only on the tokens routed to it."""

    def sequence_part(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x  # (B, T, C): nothing to do across positions

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), position by position."""
        return self.token_part(x)


class MLP(TokenwiseFFN):
    """Linear -> GELU -> Linear (GPT-2)."""

    def __init__(self, config: FFNConfig, d_model: int, bias: bool = False) -> None:
        super().__init__()
        hidden = config.hidden(d_model)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = Dropout(config.dropout)

    def token_part(self, h: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return self.dropout(self.down(gelu(self.up(h))))


class SwiGLU(TokenwiseFFN):
    """(SiLU(x W_gate) * x W_up) W_down (Shazeer 2020; LLaMA): 3 * C * hidden weights."""

    def __init__(self, config: FFNConfig, d_model: int, bias: bool = False) -> None:
        super().__init__()
        hidden = config.hidden(d_model)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = Dropout(config.dropout)

    def token_part(self, h: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


class NoFFN(TokenwiseFFN):
    """No FFN: the block adds nothing after attention (attention-only models, as in the
    Zoology MQAR grid). Its norm before it is the only trace left."""

    def __init__(self, config: FFNConfig, d_model: int, bias: bool = False) -> None:
        super().__init__()

    def token_part(self, h: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C) zeros
        return torch.zeros_like(h)


FFN.register("mlp", FFNConfig)(MLP)
FFN.register("swiglu", FFNConfig)(SwiGLU)
FFN.register("none", FFNConfig)(NoFFN)

from moa.layers import hyper_ffn  # noqa: E402, F401  (registers "hyper"; it builds on the classes above)
