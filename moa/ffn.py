"""Position-wise feed-forward networks: `mlp` (GELU) | `swiglu`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moa.registry import Registry
from moa.schema import check, check_range

FFN: Registry[nn.Module] = Registry("ffn")


@dataclass
class FFNConfig:
    name: str = "mlp"
    hidden_dim: int | None = None  # None: hidden_mult * d_model, rounded up to multiple_of
    hidden_mult: float = 4.0
    multiple_of: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
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


class MLP(nn.Module):
    """Linear -> GELU -> Linear (GPT-2)."""

    def __init__(self, config: FFNConfig, d_model: int, bias: bool = False) -> None:
        super().__init__()
        hidden = config.hidden(d_model)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.dropout(self.down(F.gelu(self.up(x))))


class SwiGLU(nn.Module):
    """(SiLU(x W_gate) * x W_up) W_down (Shazeer 2020; LLaMA)."""

    def __init__(self, config: FFNConfig, d_model: int, bias: bool = False) -> None:
        super().__init__()
        hidden = config.hidden(d_model)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


FFN.register("mlp", FFNConfig)(MLP)
FFN.register("swiglu", FFNConfig)(SwiGLU)
