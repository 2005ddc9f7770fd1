"""The masked-language-modelling head of an encoder (BERT's, RxT-Alpha's):
`Linear(C, C) -> GELU -> LayerNorm -> Linear(C, V)`, every layer with its bias."""

from __future__ import annotations

import torch
from torch import nn

from moa.layers.activation import gelu


class MaskedLMHead(nn.Module):
    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, C) -> logits (B, L, V)."""
        return self.out(self.norm(gelu(self.dense(hidden))))
