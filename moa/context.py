"""What a layer needs to know about the current forward pass, besides its input."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from moa.auxiliary import AuxiliaryRecorder
from moa.kv_cache import KVCache, LayerCache

if TYPE_CHECKING:
    from moa.position import PositionEncoding


@dataclass
class ForwardContext:
    positions: torch.Tensor  # (T,) absolute positions of the tokens in this call
    position: PositionEncoding  # shared by all layers; rotates q/k where it applies
    record: AuxiliaryRecorder
    cache: LayerCache | None = None
    # (B, K) positions where logits are wanted; None: every position. Only the vocabulary
    # projection reads it, so a loss on a few positions (mqar) skips most of its cost.
    output_positions: torch.Tensor | None = None

    def for_layer(self, index: int, kv_cache: KVCache | None) -> ForwardContext:
        return replace(
            self,
            record=self.record.scoped(f"layers.{index}"),
            cache=kv_cache.layers[index] if kv_cache is not None else None,
        )

    def scoped(self, name: str) -> ForwardContext:
        return replace(self, record=self.record.scoped(name))
