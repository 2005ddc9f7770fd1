"""What a layer needs to know about the current forward pass, besides its input."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.kv_cache import KVCache, LayerCache

if TYPE_CHECKING:
    from moa.layers.position import PositionEncoding


@dataclass
class ForwardContext:
    positions: torch.Tensor  # (T,) absolute positions of the tokens in this call
    position: PositionEncoding  # shared by all layers; rotates q/k where it applies
    record: AuxiliaryRecorder
    cache: LayerCache | None = None
    # (B, K) indices into this call's T of the positions whose outputs are wanted; None:
    # every position. The model gives it to the vocabulary projection, and to the last block
    # where nothing after it mixes positions, so a loss on a few positions (mqar) skips most
    # of the last layer as well (`LanguageModel.forward`, `at_output_positions`).
    output_positions: torch.Tensor | None = None
    # False: every query sees every key (a bidirectional encoder, a read of a memory).
    causal: bool = True
    # (B, S) True where a key is real: padding and empty memory slots are never attended.
    key_mask: torch.Tensor | None = None
    # (B, M, C): cross-attention takes its keys and values from here instead of the input.
    # They carry no positions (only the queries are rotated) and, with a cache, are
    # projected once per cache (the Reactive Transformer's STM, once per turn).
    memory: torch.Tensor | None = None

    def replace(self, **changes: object) -> ForwardContext:
        """A copy with `changes` (field name -> value): `dataclasses.replace` without its
        per-field `__init__`, which a MoA decoding step would pay some sixty times."""
        if not changes.keys() <= _FIELDS:
            raise TypeError(f"ForwardContext has no field {sorted(changes.keys() - _FIELDS)}")
        copy = object.__new__(ForwardContext)
        copy.__dict__.update(self.__dict__, **changes)
        return copy

    def for_layer(self, index: int, kv_cache: KVCache | None) -> ForwardContext:
        return self.replace(record=self.record.scoped(f"layers.{index}"),
                            cache=kv_cache.layers[index] if kv_cache is not None else None)

    def scoped(self, name: str) -> ForwardContext:
        return self.replace(record=self.record.scoped(name))


_FIELDS = frozenset(field.name for field in fields(ForwardContext))


def select_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows of x (B, T, ...) at positions (B, K) -> (B, K, ...)."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, index.expand(-1, -1, *x.shape[2:]))


def at_output_positions(module: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """module(x, ctx) at ctx.output_positions: (B, T, C) -> (B, K, C), or (B, T, C) without
    them. A module whose class sets `computes_output_positions = True` computes those
    positions only (its queries there, over every key); any other computes every position,
    of which those are kept, with the same result."""
    if ctx.output_positions is None or getattr(module, "computes_output_positions", False):
        return module(x, ctx)
    return select_positions(module(x, ctx.replace(output_positions=None)), ctx.output_positions)
