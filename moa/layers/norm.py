"""Normalisation layers: `layernorm` | `rmsnorm`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moa.registry import Registry
from moa.schema import check

NORM: Registry[nn.Module] = Registry("norm")


@dataclass
class NormConfig:
    name: str = "rmsnorm"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        check(self.eps > 0, "eps", self.eps, "a positive float")


@NORM.register("layernorm", NormConfig)
def layer_norm(config: NormConfig, dim: int, bias: bool = False) -> nn.Module:
    return nn.LayerNorm(dim, eps=config.eps, bias=bias)


@NORM.register("rmsnorm", NormConfig)
def rms_norm(config: NormConfig, dim: int, bias: bool = False) -> nn.Module:
    return nn.RMSNorm(dim, eps=config.eps)
