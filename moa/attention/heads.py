"""What every multi-head scheme shares: head counts and projections (the causal masks are
moa/kernels/masks.py, which the kernels use too).

Head layout: the model has `n_heads` heads of `head_dim` (d_model // n_heads unless set:
then the heads' total width n_heads * head_dim may differ from d_model, and the output
projection maps it back). A scheme uses `n_q_heads` query heads (fewer than `n_heads` for
Sparse Query Attention) and `n_kv_heads` key/value heads shared by groups of query heads
(GQA; 1 is MQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moa.errors import ConfigError
from moa.layers.context import ForwardContext, select_positions
from moa.schema import check, check_range

if TYPE_CHECKING:
    from collections.abc import Callable

    from moa.config import ModelConfig


@dataclass
class HeadsConfig:
    """Fields of every multi-head scheme's config."""

    name: str = "dot_product"
    n_q_heads: int | None = None  # None: the model's n_heads
    n_kv_heads: int | None = None  # None: n_q_heads (plain multi-head attention)
    dropout: float = 0.0  # on attention probabilities
    bias: bool = False

    def __post_init__(self) -> None:
        for key in ("n_q_heads", "n_kv_heads"):
            value = getattr(self, key)
            check(value is None or value > 0, key, value, "a positive integer or null")
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)

    def layout(self, model: ModelConfig) -> tuple[int, int]:
        n_q = self.n_q_heads or model.n_heads
        return n_q, self.n_kv_heads or n_q

    def validate_for(self, model: ModelConfig) -> None:
        n_q, n_kv = self.layout(model)
        if n_q > model.n_heads:
            raise ConfigError("attention.n_q_heads", n_q, f"1..{model.n_heads} (model.n_heads)",
                              "more query heads than the model has")
        if n_q % n_kv:
            allowed = [d for d in range(1, n_q + 1) if n_q % d == 0]
            raise ConfigError("attention.n_kv_heads", n_kv,
                              f"divisors of n_q_heads={n_q}: {allowed}",
                              "n_q_heads must be divisible by n_kv_heads")


class QKVProjection(nn.Module):
    """x -> q (B, Hq, T, D), k and v (B, Hkv, T, D); and heads -> output (B, T, C)."""

    def __init__(self, config: HeadsConfig, model: ModelConfig) -> None:
        super().__init__()
        self.n_q_heads, self.n_kv_heads = config.layout(model)
        self.head_dim = model.head_dim
        self.q = nn.Linear(model.d_model, self.n_q_heads * self.head_dim, bias=config.bias)
        self.kv = nn.Linear(model.d_model, 2 * self.n_kv_heads * self.head_dim, bias=config.bias)
        self.out = nn.Linear(self.n_q_heads * self.head_dim, model.d_model, bias=config.bias)
        self.out.residual = True  # scaled at init as a residual-stream projection

    def split(self, x: torch.Tensor, rows: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, Hq, T, D), k, v (B, Hkv, T, D), views of `stacked`."""
        heads = self.stacked(x, rows).transpose(1, 2)  # (B, Hq + 2 Hkv, T, D)
        return heads.split([self.n_q_heads, self.n_kv_heads, self.n_kv_heads], dim=1)

    def positioned(self, x: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`split`, then q and k rotated and v scaled by the position encoding at
        ctx.positions. Queries and keys at the same positions rotate alike, so one rotation
        of the stacked heads serves both (half the ops of two, forward and backward)."""
        heads = self.stacked(x, rows).transpose(1, 2)  # (B, Hq + 2 Hkv, T, D)
        # split, not slices: its backward joins the two gradients with one cat, where each
        # slice's would zero a gradient of the whole and copy its part in
        qk, v = heads.split([self.n_q_heads + self.n_kv_heads, self.n_kv_heads], dim=1)
        q, k = ctx.position.rotate_keys(qk, ctx.positions).split(
            [self.n_q_heads, self.n_kv_heads], dim=1)
        return q, k, ctx.position.scale_values(v, ctx.positions)

    def stacked(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, Hq + 2 Hkv, D): the query, key and value heads side by
        side. rows ((Hq + 2 Hkv) D,) multiply the output channels. With autograd (training):
        one product with the q and kv weights stacked, rows folded into the weight and bias
        (`scaled_linear`), so that each weight-sized copy saves passes over q and k.
        Without (inference): the two products apart and rows on their outputs, which keeps
        no second copy of the weights and costs little at a decoding step's one token."""
        B, T, _ = x.shape
        if torch.is_grad_enabled():
            weight = torch.cat([self.q.weight, self.kv.weight])
            bias = None if self.q.bias is None else torch.cat([self.q.bias, self.kv.bias])
            if rows is not None:
                weight, bias = weight * rows[:, None], None if bias is None else bias * rows
            heads = F.linear(x, weight, bias)
        else:
            heads = torch.cat([self.q(x), self.kv(x)], dim=-1)
            heads = heads if rows is None else heads * rows
        return heads.view(B, T, -1, self.head_dim)

    def queries(self, x: torch.Tensor, query_positions: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, T, C) -> q (B, Hq, T, D), or (B, Hq, K, D) at query_positions (B, K)."""
        x_q = x if query_positions is None else select_positions(x, query_positions)
        B, T, _ = x_q.shape
        return self.q(x_q).view(B, T, self.n_q_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, source: torch.Tensor, rows: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """source (B, S, C) -> k, v (B, Hkv, S, D): the input itself, or a memory. rows
        (2 Hkv D,: the keys' then the values') multiply the output channels."""
        B, S, _ = source.shape
        kv = scaled_linear(source, self.kv, rows).view(B, S, 2, self.n_kv_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return k, v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, T, D = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


def scaled_linear(x: torch.Tensor, linear: nn.Linear, rows: torch.Tensor | None) -> torch.Tensor:
    """linear(x) * rows (per output channel), with rows folded into the weight and bias: a
    product the size of the weight, forward and backward, instead of one the size of the
    activations (metric attention's Mahalanobis scales and query factor)."""
    if rows is None:
        return linear(x)
    bias = None if linear.bias is None else linear.bias * rows
    return F.linear(x, linear.weight * rows[:, None], bias)


def memory_keys_values(ctx: ForwardContext, project: Callable[[torch.Tensor], tuple]) -> tuple:
    """project(ctx.memory): the keys and values (and whatever a scheme keeps beside them)
    of the memory that cross-attention reads, computed once per cache: a decoding step
    reuses what the prompt projected."""
    if ctx.cache is None:
        return project(ctx.memory)
    return ctx.cache.kept("memory", lambda: project(ctx.memory))
