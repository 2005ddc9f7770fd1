"""Position encodings: `learned` (absolute, added to the embeddings) | `rope` (rotary).

One instance is shared by all layers. `embed` acts on the token embeddings; `rotate`
acts on each attention layer's queries and keys (identity where it does not apply).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moa.registry import Registry
from moa.schema import check

POSITION: Registry[nn.Module] = Registry("position")


class PositionEncoding(nn.Module):
    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


@dataclass
class LearnedPositionConfig:
    name: str = "learned"


class LearnedPosition(PositionEncoding):
    def __init__(self, config: LearnedPositionConfig, max_seq_len: int, d_model: int,
                 head_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_seq_len, d_model)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.embedding(positions)  # (B, T, C) + (T, C)


@dataclass
class RotaryConfig:
    name: str = "rope"
    theta: float = 10000.0

    def __post_init__(self) -> None:
        check(self.theta > 0, "theta", self.theta, "a positive float")


class RotaryPosition(PositionEncoding):
    """RoFormer's rotation, in the half-split layout of GPT-NeoX and LLaMA."""

    def __init__(self, config: RotaryConfig, max_seq_len: int, d_model: int,
                 head_dim: int) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        inv_freq = config.theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (L, D/2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].to(q.dtype)  # (T, D/2)
        sin = self.sin[positions].to(q.dtype)
        return _rotate_half_split(q, cos, sin), _rotate_half_split(k, cos, sin)


def _rotate_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


POSITION.register("learned", LearnedPositionConfig)(LearnedPosition)
POSITION.register("rope", RotaryConfig)(RotaryPosition)
