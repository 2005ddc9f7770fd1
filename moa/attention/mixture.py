"""A routed mixture of attention paths: `sum_i w_i(x) * gate_i(path_i(x))` per token.

`paths` is a list of attention configs, each any registered scheme (`dot_product` with
any head layout, `metric`, `local_conv`, `channel_mix`, ...), and `router` a
`RouterConfig` (`moa/layers/router.py`) giving the per-token weights w. MoAS is this with MHA,
GQA and MQA paths (`conf/attention/moas.yaml`, `moas_static.yaml`); the MoA block of the
MoA cards is this with local-conv, metric, channel-mix and metric-MQA paths.

Each path records under `paths.<i>.` and owns a child `LayerCache` in the layer cache's
`state`, so paths never share cache names (two dot-product paths both append "k"/"v").

Sparse execution, when the router chooses (topk), is `moa/layers/branches.py`'s `routed_sum`: a
path that splits into a `sequence_part(x, ctx)` over all tokens and a `token_part(h)`
acting on each row alone (`channel_mix`: the whole MLP; `local_conv`: the pointwise
projection) runs its `token_part` on the routed tokens only. Other paths (attention) are
computed for every token and weighted by 0 where unrouted. The result equals the dense
computation with the unrouted weights zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moa.attention.registry import ATTENTION
from moa.errors import ConfigError
from moa.layers.branches import routed_sum
from moa.layers.router import ROUTER, FeatureGates, RouterConfig
from moa.schema import check

if TYPE_CHECKING:
    from moa.config import ModelConfig
    from moa.layers.context import ForwardContext


@dataclass
class MixtureConfig:
    name: str = "mixture"
    paths: list[Any] = field(default_factory=list)  # attention configs, parsed by name
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        check(len(self.paths) >= 2, "paths", self.paths, "a list of two or more attention configs")
        self.paths = [ATTENTION.parse(path, f"paths.{i}") for i, path in enumerate(self.paths)]
        if self.router.name == "topk":
            check(self.router.router_topk <= len(self.paths), "router.router_topk",
                  self.router.router_topk, f"1..{len(self.paths)} (the number of paths)")

    def validate_for(self, model: ModelConfig) -> None:
        for i, path in enumerate(self.paths):
            validate = getattr(path, "validate_for", None)
            if validate is None:
                continue
            try:
                validate(model)
            except ConfigError as error:  # the path names its key as `attention.<field>`
                key = error.key.removeprefix("attention.")
                raise ConfigError(f"attention.paths.{i}.{key}", error.value, error.allowed,
                                  error.reason) from None


@ATTENTION.register("mixture", MixtureConfig)
class MixtureOfAttentions(nn.Module):
    computes_output_positions = True  # each path at ctx.output_positions, when given

    def __init__(self, config: MixtureConfig, model: ModelConfig) -> None:
        super().__init__()
        n = len(config.paths)
        self.paths = nn.ModuleList(ATTENTION.build(path, model) for path in config.paths)
        self.router = ROUTER.build(config.router, model.d_model, n)
        self.feature_gates = FeatureGates(model.d_model, n) \
            if config.router.enable_feature_gates else None

    def gate(self, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.feature_gates is None else self.feature_gates(index, x, y)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); causal when every path is, the router being per token.
        With ctx.output_positions (B, K): -> (B, K, C), the router still run on every token,
        so its statistics and balance loss are the full forward's."""
        routing = self.router(x, ctx.record.scoped("router"))
        return routed_sum(x, routing, self.paths, ctx, "paths", self.feature_gates)
