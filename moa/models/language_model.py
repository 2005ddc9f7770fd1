"""The decoder-only language model, in plain PyTorch.

    from moa import build_model
    model = build_model(config)            # a ModelConfig (or its dict)
    logits = model(input_ids).logits       # (B, T) -> (B, T, V)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moa.attention import ATTENTION
from moa.config import ModelConfig
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.branches import branch_context
from moa.layers.context import ForwardContext, at_output_positions, select_positions
from moa.layers.ffn import FFN, TokenwiseFFN
from moa.layers.head import HEAD, LinearHead
from moa.layers.kv_cache import KVCache
from moa.layers.norm import NORM
from moa.layers.position import POSITION
from moa.layers.residual import Dropout, DropPath, LayerScale
from moa.models.registry import build_model, register_model

__all__ = ["Block", "LanguageModel", "ModelOutput", "build_model", "shared_parameters"]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V); (B, K, V) with output_positions
    aux_losses: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None  # sum of weight * value, None without any


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + ffn(norm(x)); each branch
    optionally through LayerScale and DropPath (`model.layer_scale_init`, `model.drop_path`).
    With `ffn.placement: shared` the block has no FFN (`SharedFFN` follows the stack)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        has_ffn = config.ffn.placement == "block"
        self.attention_norm = NORM.build(config.norm, config.d_model, config.bias)
        self.attention = ATTENTION.build(config.attention, config)
        if has_ffn:
            self.ffn_norm = NORM.build(config.norm, config.d_model, config.bias)
        self.ffn = FFN.build(config.ffn, config.d_model, config.bias) if has_ffn else None
        self.dropout = Dropout(config.dropout)
        init = config.layer_scale_init
        self.attention_scale = nn.Identity() if init is None else LayerScale(config.d_model, init)
        if has_ffn:
            self.ffn_scale = nn.Identity() if init is None else LayerScale(config.d_model, init)
        self.drop_path = DropPath(config.drop_path)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), or (B, K, C) at ctx.output_positions (B, K), for which
        the FFN must act on each token alone (the model gives them only then)."""
        y = at_output_positions(self.attention, self.attention_norm(x), ctx.scoped("attention"))
        if ctx.output_positions is not None:
            x = select_positions(x, ctx.output_positions)
        x = x + self.drop_path(self.attention_scale(self.dropout(y)))
        if self.ffn is None:
            return x
        ffn_ctx = branch_context(ctx.replace(output_positions=None), "ffn")  # x is selected
        y = self.ffn(self.ffn_norm(x), ffn_ctx)
        return x + self.drop_path(self.ffn_scale(self.dropout(y)))


class SharedFFN(nn.Module):
    """x + ffn(norm(x)) once after the stack (`ffn.placement: shared`, DiscoverLM's HyperFFN)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = NORM.build(config.norm, config.d_model, config.bias)
        self.ffn = FFN.build(config.ffn, config.d_model, config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x + self.dropout(self.ffn(self.norm(x), ctx))


@register_model("language_model")
class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size must be set (taken from the tokenizer) to build")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position = POSITION.build(config.position, config.max_seq_len, config.d_model,
                                       config.head_dim)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.shared_ffn = SharedFFN(config) if config.ffn.placement == "shared" else None
        self.norm = NORM.build(config.norm, config.d_model, config.bias)
        self.lm_head = HEAD.build(config.head, config, self.embedding)
        # With output_positions, the last block computes those positions only when nothing
        # after its attention mixes positions: a token-wise FFN, no shared FFN, a linear head.
        last_ffn = self.blocks[-1].ffn
        self.last_block_at_outputs = (
            self.shared_ffn is None and isinstance(self.lm_head, LinearHead)
            and (last_ffn is None or isinstance(last_ffn, TokenwiseFFN)))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.init_std, self.config.n_layers)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                output_positions: torch.Tensor | None = None) -> ModelOutput:
        """input_ids: (B, T) -> logits (B, T, V). With a cache, the tokens continue it.

        output_positions: (B, K) indices into T; the logits are then (B, K, V), those
        positions' only (the same values as the full logits there). Only the vocabulary
        projection and, where nothing after it mixes positions, the last block's queries and
        FFN run at those positions alone."""
        start = cache.length if cache is not None else 0
        T = input_ids.size(1)
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len="
                             f"{self.config.max_seq_len}")
        positions = torch.arange(start, start + T, device=input_ids.device)
        record = AuxiliaryRecorder()
        ctx = ForwardContext(positions=positions, position=self.position, record=record)
        last_block_at = output_positions if self.last_block_at_outputs else None
        x = self.dropout(self.position.embed(self.embedding(input_ids), positions))
        with self.position.one_forward():  # the layers share its tables
            for index, block in enumerate(self.blocks):
                layer_ctx = ctx.for_layer(index, cache)
                if index == len(self.blocks) - 1:
                    layer_ctx = layer_ctx.replace(output_positions=last_block_at)
                x = block(x, layer_ctx)  # (B, K, C) after the last block where it selects
        if self.shared_ffn is not None:
            x = self.shared_ffn(x, _slot(ctx, cache, "ffn"))
        head_ctx = _slot(ctx, cache, "head").replace(
            output_positions=None if last_block_at is not None else output_positions)
        logits = self.lm_head(self.norm(x), head_ctx)
        if cache is not None:
            cache.length += T
        return ModelOutput(logits, record.losses, record.stats, record.total_loss())

    def new_cache(self, capacity: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, capacity or self.config.max_seq_len)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # tied weights counted once
        total = sum(p.numel() for p in params.values())
        if exclude_embedding:
            total -= self.embedding.weight.numel()
        return total


def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2's: N(0, std); projections into the residual stream scaled by 1/sqrt(2 * layers)."""
    if isinstance(module, nn.Linear):
        if getattr(module, "residual", False):
            std /= math.sqrt(2 * n_layers)
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)


def shared_parameters(module: nn.Module) -> dict[str, str]:
    """{tied name: source name} for each parameter held under two names (the LM head's
    matrix and the embedding, wherever the head keeps it)."""
    first: dict[int, str] = {}
    tied = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return tied


def _slot(ctx: ForwardContext, cache: KVCache | None, name: str) -> ForwardContext:
    """The context of the module `name` after the stack (`ffn`, `head`): its record scope
    and its slot of the cache."""
    return ctx.scoped(name).replace(cache=None if cache is None else getattr(cache, name))
