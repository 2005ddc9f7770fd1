"""Scaled dot-product self-attention: MHA, GQA, MQA and SQA as one module.

The four schemes differ only in head counts (`conf/attention/{mha,gqa,mqa,sqa}.yaml`):
MHA has n_q = n_kv = n_heads; GQA shares each K/V head among n_q / n_kv query heads;
MQA has one K/V head; SQA (Sparse Query Attention) uses fewer query heads than the
model's n_heads, cutting the score FLOPs by n_heads / n_q.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moa.attention.heads import HeadsConfig, QKVProjection, memory_keys_values
from moa.attention.registry import ATTENTION
from moa.kernels.dot_product import dot_product_attention
from moa.kernels.masks import attention_mask

if TYPE_CHECKING:
    from moa.config import ModelConfig
    from moa.layers.context import ForwardContext


@ATTENTION.register("dot_product", HeadsConfig)
class SelfAttention(nn.Module):
    computes_output_positions = True  # queries at ctx.output_positions only, when given
    bidirectional = True  # honours ctx.causal=False and ctx.memory (encoders, memory reads)

    def __init__(self, config: HeadsConfig, model: ModelConfig) -> None:
        super().__init__()
        self.heads = QKVProjection(config, model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); causal over the cached and the new positions unless
        ctx.causal is False, over the keys ctx.key_mask (B, S) keeps. With ctx.memory
        (B, M, C), cross-attention: keys and values from the memory, without positions.
        With ctx.output_positions (B, K), only those positions query: -> (B, K, C)."""
        wanted = ctx.output_positions
        at = None if wanted is None else ctx.positions[wanted]  # (B, K) absolute positions
        if ctx.memory is None:
            if wanted is None:  # (B, Hq, T, D), (B, Hkv, T, D) x2
                q, k, v = self.heads.positioned(x, ctx)
            else:  # (B, Hq, K, D)
                q, (k, v) = self.heads.queries(x, wanted), self.heads.keys_values(x)
                q, k = ctx.position.rotate(q, k, ctx.positions, at)
                v = ctx.position.scale_values(v, ctx.positions)
            if ctx.cache is not None:
                k, v = ctx.cache.append("k", k), ctx.cache.append("v", v)  # (B, Hkv, S, D)
        else:
            q = self.heads.queries(x, wanted)  # (B, Hq, T or K, D)
            q = ctx.position.rotate_queries(q, ctx.positions if at is None else at)
            k, v = memory_keys_values(ctx, self.heads.keys_values)  # (B, Hkv, M, D)
        mask, is_causal = attention_mask(q.size(2), k.size(2), x.device,
                                         ctx.causal and ctx.memory is None, ctx.key_mask, at)
        y = dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                  dropout_p=self.dropout if self.training else 0.0)
        return self.heads.merge(y)
