"""The memory attention: how a finished interaction is written into the short-term memory.

For each layer l, with ED_l the encoder's layer-l output for concat(query, answer):

    update = Attn(Q = norm(STM_l), K = V = norm(ED_l))        every slot reads every token
    STM_l <- (1 - G) * STM_l + G * update                      G = sigmoid(...) in (0, 1)

The new STM is a convex mix of the old one and an attention output, so it stays bounded
over any number of turns (an ungated residual `STM + update` grows without bound). The
gate is `slot` (a learned logit per layer and slot) or `linear` (per slot, from its
content: `sigmoid(w . (STM_l + update) + b)`). The `interlayer` variant first lets each
layer's slots read the mean of all layers, `STM'_l = STM_l + Attn(norm(STM_l),
norm(mean_k STM_k))`, and queries ED_l with STM'_l. Neither side carries positions: the
slots are a set, and the encoder's outputs already hold their positions.
"""

from __future__ import annotations

import torch
from torch import nn

from moa.attention import ATTENTION
from moa.config import ReactiveConfig
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.context import ForwardContext
from moa.layers.norm import NORM
from moa.layers.position import PositionEncoding


class ResidualGate(nn.Module):
    """G (B, slots, 1) in (0, 1) for one memory layer."""

    def __init__(self, config: ReactiveConfig) -> None:
        super().__init__()
        memory = config.memory_attention
        self.linear = None
        if memory.gate == "linear":
            self.linear = nn.Linear(config.d_model, 1)
        else:
            self.logit = nn.Parameter(torch.full((config.stm_slots, 1), memory.gate_init))
        self.gate_init = memory.gate_init

    def reset_parameters(self) -> None:
        """The linear gate starts at G = sigmoid(gate_init) whatever the memory holds."""
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)
            nn.init.constant_(self.linear.bias, self.gate_init)

    def forward(self, memory: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.linear is None:
            return torch.sigmoid(self.logit).to(memory.dtype)  # (slots, 1)
        return torch.sigmoid(self.linear(memory + update))  # (B, slots, 1)


NO_POSITIONS = PositionEncoding()  # the identity: slots and encoder outputs get no rotation


class MemoryRead(nn.Module):
    """Attn(Q = norm(queries), K = V = norm(source)) with the scheme of
    `model.memory_attention.attention`: queries (B, S, C), source (B, L, C) -> (B, S, C)."""

    def __init__(self, config: ReactiveConfig) -> None:
        super().__init__()
        self.query_norm = NORM.build(config.norm, config.d_model, config.bias)
        self.source_norm = NORM.build(config.norm, config.d_model, config.bias)
        self.attention = ATTENTION.build(config.memory_attention.attention, config)

    def forward(self, queries: torch.Tensor, source: torch.Tensor,
                source_mask: torch.Tensor | None) -> torch.Tensor:
        ctx = ForwardContext(positions=torch.arange(queries.size(1), device=queries.device),
                             position=NO_POSITIONS, record=AuxiliaryRecorder(), causal=False,
                             key_mask=source_mask, memory=self.source_norm(source))
        return self.attention(self.query_norm(queries), ctx)


class MemoryLayerWrite(nn.Module):
    def __init__(self, config: ReactiveConfig) -> None:
        super().__init__()
        self.interlayer = None
        if config.memory_attention.variant == "interlayer":
            self.interlayer = MemoryRead(config)
        self.read = MemoryRead(config)
        self.gate = ResidualGate(config)

    def forward(self, memory: torch.Tensor, layer_mean: torch.Tensor, encoded: torch.Tensor,
                pad_mask: torch.Tensor | None) -> torch.Tensor:
        """memory (B, slots, C) this layer's, layer_mean (B, slots, C), encoded (B, L, C)
        -> the new memory (B, slots, C)."""
        queries = memory
        if self.interlayer is not None:
            queries = memory + self.interlayer(memory, layer_mean, None)
        update = self.read(queries, encoded, pad_mask)
        gate = self.gate(memory, update)
        return (1 - gate) * memory + gate * update


class MemoryAttention(nn.Module):
    def __init__(self, config: ReactiveConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MemoryLayerWrite(config) for _ in range(config.n_layers))

    def reset_gates(self) -> None:
        for layer in self.layers:
            layer.gate.reset_parameters()

    def forward(self, memory: torch.Tensor, encoded_layers: torch.Tensor,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """memory (n_layers, B, slots, C), encoded_layers (n_layers, B, L, C), pad_mask
        (B, L) True = real token -> the new memory (n_layers, B, slots, C)."""
        layer_mean = memory.mean(0)  # (B, slots, C): what the interlayer variant reads
        return torch.stack([write(memory[index], layer_mean, encoded_layers[index], pad_mask)
                            for index, write in enumerate(self.layers)])
