"""The Reactive Transformer's encoder and decoder: stacks of the same pre-norm block.

A block is self-attention, then (where the stack reads the memory) cross-attention into
its layer of the memory, then the FFN, each `x + branch(norm(x))`. The memory's keys and
values come from `norm(memory_l)` and carry no positions; the queries are rotated at the
tokens' positions (`ForwardContext.memory`). The encoder's self-attention is
bidirectional, the decoder's causal; the attention modules are the registry's schemes
(`moa/attention/`), so any scheme that can see every key reads the memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moa.attention import ATTENTION
from moa.config import ReactiveConfig
from moa.layers.context import ForwardContext
from moa.layers.ffn import FFN
from moa.layers.head import HEAD
from moa.layers.kv_cache import KVCache
from moa.layers.norm import NORM
from moa.layers.residual import Dropout


def _norm(config: ReactiveConfig) -> nn.Module:
    return NORM.build(config.norm, config.d_model, config.bias)


class MemoryBlock(nn.Module):
    def __init__(self, config: ReactiveConfig, self_attention: Any, reads_memory: bool
                 ) -> None:
        super().__init__()
        self.attention_norm = _norm(config)
        self.attention = ATTENTION.build(self_attention, config)
        self.cross_attention = None
        if reads_memory:
            self.cross_norm = _norm(config)
            self.memory_norm = _norm(config)
            self.cross_attention = ATTENTION.build(config.cross_attention, config)
        self.ffn_norm = _norm(config)
        self.ffn = FFN.build(config.ffn, config.d_model, config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, memory: torch.Tensor | None,
                memory_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C), memory (B, M, C) this layer's, memory_mask (B, M) True = real slot
        -> (B, T, C)."""
        x = x + self.dropout(self.attention(self.attention_norm(x), ctx.scoped("attention")))
        if self.cross_attention is not None:
            read = ctx.scoped("cross_attention").replace(
                causal=False, key_mask=memory_mask, memory=self.memory_norm(memory),
                cache=None if ctx.cache is None else ctx.cache.child("memory"))
            x = x + self.dropout(self.cross_attention(self.cross_norm(x), read))
        return x + self.dropout(self.ffn(self.ffn_norm(x), ctx.scoped("ffn")))


class MemoryStack(nn.Module):
    """Blocks and a final norm; `layers` returns each block's output (the encoder's are
    what the memory attention writes, one per memory layer)."""

    def __init__(self, config: ReactiveConfig, self_attention: Any, reads_memory: bool
                 ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MemoryBlock(config, self_attention, reads_memory)
                                    for _ in range(config.n_layers))
        self.norm = _norm(config)

    def layers(self, x: torch.Tensor, ctx: ForwardContext, memory: torch.Tensor | None,
               memory_mask: torch.Tensor | None, cache: KVCache | None = None
               ) -> list[torch.Tensor]:
        """x (B, T, C), memory (n_layers, B, M, C) or None -> each block's output (B, T, C)."""
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x, ctx.for_layer(index, cache), None if memory is None else memory[index],
                      memory_mask)
            outputs.append(x)
        return outputs


class Encoder(MemoryStack):
    """Bidirectional; reads the memory where `model.encoder_reads_memory` (RxNN's RxT-Alpha)."""

    def __init__(self, config: ReactiveConfig) -> None:
        super().__init__(config, config.attention, config.encoder_reads_memory)


class Decoder(MemoryStack):
    """Causal; reads the memory in every block; its LM head (tied to the shared embedding
    under `model.tie_embeddings`)."""

    def __init__(self, config: ReactiveConfig, embedding: nn.Embedding) -> None:
        super().__init__(config, config.decoder_attention, reads_memory=True)
        self.lm_head = HEAD.build(config.head, config, embedding)
