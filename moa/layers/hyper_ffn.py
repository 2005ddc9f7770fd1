"""HyperFFN (`ffn=hyper`): SwiGLU, causal-conv and gated low-rank branches, routed per token.

    y = sum_i w_i(x) * branch_i(x),   w = router(x) over the `branches`

Branches (`branches`, any of them in any order; their number is the router's n):

- `swiglu`: `SwiGLU` of width `hidden(C)` (`hidden_dim`, or `hidden_mult * C` rounded up
  to `multiple_of`), as `ffn=swiglu`.
- `conv`: a causal depthwise-separable convolution: the depthwise causal conv of
  `local_conv` over the last `conv_kernel` positions (its rolling window kept in the
  branch's cache when decoding), then a pointwise GELU MLP `C -> M -> C`, M = `conv_hidden`
  or `conv_mult * C`.
- `low_rank`: a gated low-rank map, the SwiGLU form at rank `lr_rank`:
  `(SiLU(x A) * x B) D` with A, B: C x r and D: r x C.

`router` is a `RouterConfig` (`moa/layers/router.py`): `softmax` mixes every branch densely,
`topk` runs each token through its `router_topk` best branches only; sparse execution
is the mixture's (`moa/layers/branches.py`): the conv's depthwise part runs for every token (the
decoding window must advance), each branch's per-token MLP only on its routed tokens.

Parameters, with C = d_model, n = number of branches, b = 1 with `model.bias` else 0
(`num_parameters` computes it; DiscoverLM's shared HyperFFN budget is 4.2M at C = 512):

    swiglu    3 C H + b (2 H + C)              H = hidden(C)
    conv      K C + 2 C M + b (2 C + M)        K = conv_kernel, M = conv width
    low_rank  3 C r + b (2 r + C)              r = lr_rank
    router    C n + n, or C h + h + h n + n with router_hidden h; + C n with router gates;
              + n (2 C^2 + 2 C) with feature gates
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from moa.attention.local_conv import CausalDepthwiseConv
from moa.layers.branches import routed_sum
from moa.layers.ffn import FFN, MLP, FFNConfig, SwiGLU
from moa.layers.residual import Dropout
from moa.layers.router import ROUTER, FeatureGates, RouterConfig
from moa.schema import check

if TYPE_CHECKING:
    from moa.layers.context import ForwardContext


@dataclass
class HyperFFNConfig(FFNConfig):
    """`hidden_dim`, `hidden_mult`, `multiple_of` size the swiglu branch; `dropout` acts on
    the mixed output; `placement` as for every FFN."""

    name: str = "hyper"
    branches: list[str] = field(default_factory=lambda: ["swiglu", "conv", "low_rank"])
    conv_kernel: int = 4  # positions the conv branch sees: itself and conv_kernel - 1 before
    conv_hidden: int | None = None  # None: conv_mult * d_model
    conv_mult: float = 2.0
    lr_rank: int = 32
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.branches) >= 1 and all(b in BRANCHES for b in self.branches),
              "branches", self.branches, f"a non-empty list of {' | '.join(BRANCHES)}")
        check(self.conv_kernel > 0, "conv_kernel", self.conv_kernel, "a positive integer")
        check(self.conv_hidden is None or self.conv_hidden > 0, "conv_hidden",
              self.conv_hidden, "a positive integer, or null for conv_mult * d_model")
        check(self.conv_mult > 0, "conv_mult", self.conv_mult, "a positive float")
        check(self.lr_rank > 0, "lr_rank", self.lr_rank, "a positive integer")
        if self.router.name == "topk":
            check(self.router.router_topk <= len(self.branches), "router.router_topk",
                  self.router.router_topk, f"1..{len(self.branches)} (the number of branches)")

    def conv_width(self, d_model: int) -> int:
        return self.conv_hidden or int(self.conv_mult * d_model)

    def num_parameters(self, d_model: int, bias: bool = False) -> int:
        """The HyperFFN's parameter count (formulas in the module docstring)."""
        C, n, b = d_model, len(self.branches), int(bias)
        branches = sum(BRANCHES[name].parameters(self, C, b) for name in self.branches)
        return branches + router_parameters(self.router, C, n)


def router_parameters(config: RouterConfig, d_model: int, n: int) -> int:
    """Parameters of a router over n choices and of its feature gates (FiLM per choice)."""
    if config.name == "static":
        return 0
    h = config.router_hidden
    count = d_model * n + n if h is None else d_model * h + h + h * n + n
    count += d_model * n if config.enable_router_gates else 0
    count += n * (2 * d_model * d_model + 2 * d_model) if config.enable_feature_gates else 0
    return count


class ConvBranch(nn.Module):
    """Depthwise causal conv (every token), then a pointwise GELU MLP (each token alone)."""

    def __init__(self, d_model: int, kernel: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.depthwise = CausalDepthwiseConv(d_model, kernel, bias)
        self.pointwise = MLP(FFNConfig(hidden_dim=hidden), d_model, bias)

    def sequence_part(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), continuing the cached window."""
        return self.depthwise(x, ctx.cache)

    def token_part(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., C) -> (..., C), each row alone."""
        return self.pointwise.token_part(h)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.token_part(self.sequence_part(x, ctx))


@dataclass(frozen=True)
class Branch:
    build: Callable[[HyperFFNConfig, int, bool], nn.Module]
    parameters: Callable[[HyperFFNConfig, int, int], int]  # (config, C, b)


def _glu_parameters(C: int, H: int, b: int) -> int:
    return 3 * C * H + b * (2 * H + C)


BRANCHES: dict[str, Branch] = {
    "swiglu": Branch(
        lambda config, C, bias: SwiGLU(FFNConfig(hidden_dim=config.hidden(C)), C, bias),
        lambda config, C, b: _glu_parameters(C, config.hidden(C), b)),
    "conv": Branch(
        lambda config, C, bias: ConvBranch(C, config.conv_kernel, config.conv_width(C), bias),
        lambda config, C, b: (config.conv_kernel * C + 2 * C * config.conv_width(C)
                              + b * (2 * C + config.conv_width(C)))),
    "low_rank": Branch(
        lambda config, C, bias: SwiGLU(FFNConfig(hidden_dim=config.lr_rank), C, bias),
        lambda config, C, b: _glu_parameters(C, config.lr_rank, b)),
}


@FFN.register("hyper", HyperFFNConfig)
class HyperFFN(nn.Module):
    def __init__(self, config: HyperFFNConfig, d_model: int, bias: bool = False) -> None:
        super().__init__()
        n = len(config.branches)
        self.branches = nn.ModuleList(BRANCHES[name].build(config, d_model, bias)
                                      for name in config.branches)
        self.router = ROUTER.build(config.router, d_model, n)
        self.feature_gates = FeatureGates(d_model, n) \
            if config.router.enable_feature_gates else None
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); causal, each branch with its own cache."""
        routing = self.router(x, ctx.record.scoped("router"))
        return self.dropout(routed_sum(x, routing, self.branches, ctx, "branches",
                                       self.feature_gates))
