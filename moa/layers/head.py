"""LM heads: final hidden states (B, T, C) -> logits (B, T, V); the `HEAD` registry.

- `linear`: `x W^T`, W tied to the token embedding when `model.tie_embeddings` (the
  model's head before heads were a group; same weights, same `lm_head.weight` key).
- `moa`: the MoA cards' head. Over the final hidden states (after the model's norm):

      x = x + drop(attention(norm(x)))     own heads of head_dim (16), default a routed
                                           mixture of MHA, MQA and channel-mix paths
      x = x + drop(ffn(norm(x)))           SwiGLU (any FFN config)
      logits = linear(norm(x))             the `linear` head: tied vocabulary projection

  The attention sees the model with `n_heads = d_model / head_dim`, so its paths' head
  counts (`n_q_heads`, `n_kv_heads`) are the head's own. It adds no position encoding:
  the hidden states already carry their positions, and it is causal (NoPE). It keeps its
  cache in the model cache's `head` slot, so cached decoding equals the full forward.

Parameters of `moa`, with C = d_model, b = 1 with `model.bias` else 0, D = head_dim:

    attention  per dot-product path with h query and g key/value heads: C D (2 h + 2 g)
               + b (D (h + 2 g) + C); channel_mix of width m: 2 C m + b (m + C);
               router and gates as in `moa.layers.hyper_ffn.router_parameters` (n = paths)
    ffn        SwiGLU: 3 C H + b (2 H + C), or the chosen FFN's count
    norms      3 C (RMSNorm; LayerNorm: 3 C (1 + b))
    vocab      0 when tied, else V C
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moa.attention import ATTENTION
from moa.errors import ConfigError
from moa.layers.branches import branch_context
from moa.layers.context import select_positions
from moa.layers.ffn import FFN
from moa.layers.norm import NORM
from moa.layers.position import PositionEncoding
from moa.layers.residual import Dropout
from moa.registry import Registry
from moa.schema import check, check_range

if TYPE_CHECKING:
    from moa.config import ModelConfig
    from moa.layers.context import ForwardContext

HEAD: Registry[nn.Module] = Registry("head")


@dataclass
class LinearHeadConfig:
    name: str = "linear"


@HEAD.register("linear", LinearHeadConfig)
class LinearHead(nn.Linear):
    """A bias-free `Linear(C, V)`, its weight the embedding's when tied."""

    def __init__(self, config: LinearHeadConfig, model: ModelConfig,
                 embedding: nn.Embedding) -> None:
        super().__init__(model.d_model, model.vocab_size, bias=False)
        if model.tie_embeddings:
            self.weight = embedding.weight

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> logits (B, T, V), or (B, K, V) at `ctx.output_positions` (B, K)."""
        if ctx.output_positions is not None:
            x = select_positions(x, ctx.output_positions)  # (B, K, C)
        return super().forward(x)


def _default_attention() -> dict[str, Any]:
    return {"name": "mixture",
            "paths": [{"name": "dot_product"}, {"name": "dot_product", "n_kv_heads": 1},
                      {"name": "channel_mix"}],
            "router": {"name": "softmax"}}


@dataclass
class MoAHeadConfig:
    name: str = "moa"
    head_dim: int = 16  # the attention's heads: d_model / head_dim of them
    attention: Any = None  # any attention config; None: MHA + MQA + channel-mix, softmax-routed
    ffn: Any = None  # any FFN config; None: SwiGLU
    proj_drop: float = 0.0  # dropout on the attention and FFN outputs

    def __post_init__(self) -> None:
        check(self.head_dim > 0, "head_dim", self.head_dim, "a positive integer")
        check_range("proj_drop", self.proj_drop, 0.0, 1.0, high_open=True)
        # None, not a default dict: OmegaConf would merge a given config into the default's keys
        self.attention = ATTENTION.parse(self.attention or _default_attention(), "attention")
        self.ffn = FFN.parse(self.ffn or {"name": "swiglu"}, "ffn")
        check(self.ffn.placement == "block", "ffn.placement", self.ffn.placement, "block",
              "the head's FFN sits in the head")

    def attention_model(self, model: ModelConfig) -> ModelConfig:
        """The model as the head's attention sees it: heads of `head_dim`."""
        return dataclasses.replace(model, n_heads=model.d_model // self.head_dim,
                                   head_dim=self.head_dim)

    def validate_for(self, model: ModelConfig) -> None:
        check(model.d_model % self.head_dim == 0, "head.head_dim", self.head_dim,
              f"a divisor of model.d_model={model.d_model}")
        validate = getattr(self.attention, "validate_for", None)
        if validate is None:
            return
        try:
            validate(self.attention_model(model))
        except ConfigError as error:  # named `attention.<key>`
            raise error.under("head") from None


@HEAD.register("moa", MoAHeadConfig)
class MoAHead(nn.Module):
    def __init__(self, config: MoAHeadConfig, model: ModelConfig,
                 embedding: nn.Embedding) -> None:
        super().__init__()
        C = model.d_model
        self.position = PositionEncoding()  # no rotation: see the module docstring
        self.attention_norm = NORM.build(model.norm, C, model.bias)
        self.attention = ATTENTION.build(config.attention, config.attention_model(model))
        self.ffn_norm = NORM.build(model.norm, C, model.bias)
        self.ffn = FFN.build(config.ffn, C, model.bias)
        self.norm = NORM.build(model.norm, C, model.bias)
        self.dropout = Dropout(config.proj_drop)
        self.vocab = LinearHead(LinearHeadConfig(), model, embedding)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> logits (B, T, V), or (B, K, V) at `ctx.output_positions`; causal,
        continuing `ctx.cache`."""
        every = ctx.replace(position=self.position, output_positions=None)  # all positions
        x = x + self.dropout(self.attention(self.attention_norm(x), every.scoped("attention")))
        x = x + self.dropout(self.ffn(self.ffn_norm(x), branch_context(every, "ffn")))
        return self.vocab(self.norm(x), ctx)
