"""`objective=rxt_memory`: self-supervised pre-training of the memory attention (stage 3).

The memory state has no labels, so the label of each write is a weighted mean of its two
inputs: the old STM and the newly encoded interaction, the weight on the new data falling
over the turns of a conversation (Reactive AI's supervised-training article):

    w_0 = first_weight (0.9: the first write is mostly the first interaction)
    w_t = max(min_weight, weight - t * decay)            for turns t >= 1
    label_t = w_t * ED_t + (1 - w_t) * STM_{t-1}
    loss = mean over turns, layers, batch and slots of -cos(STM_t, label_t)

ED_t is the encoder's layer outputs for turn t's interaction (reading STM_{t-1} where the
encoder has memory cross-attention; encoded without gradients:
only the memory attention trains; conf/objective/rxt_memory.yaml freezes the rest), laid on
the slots position by position as Reactive AI does with message length = slots (256 on the
card): position i onto slot i, zero where the interaction is shorter (padding included),
cut where it is longer. Each write starts from the previous one detached, as with one
optimizer step a turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moa.schema import check_range
from moa.training.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    StepOutput,
    require_methods,
)


@dataclass
class MemoryAttentionConfig(ObjectiveConfig):
    name: str = "rxt_memory"
    first_weight: float = 0.9  # weight of the new interaction in the first write's label
    weight: float = 0.5  # ... in the second write's (turn 1), then falling by `decay` a turn
    decay: float = 0.05
    min_weight: float = 0.05

    def __post_init__(self) -> None:
        for name in ("first_weight", "weight", "min_weight"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_range("decay", self.decay, 0.0, 1.0)

    def new_data_weight(self, turn: int) -> float:
        if turn == 0:
            return self.first_weight
        return max(self.min_weight, self.weight - turn * self.decay)


def on_slots(layers: torch.Tensor, pad_mask: torch.Tensor, slots: int) -> torch.Tensor:
    """Encoded layers (n_layers, B, L, d) laid on `slots`: (n_layers, B, slots, d)."""
    layers = layers * pad_mask[None, :, :, None]
    length = layers.size(2)
    if length >= slots:
        return layers[:, :, :slots]
    return F.pad(layers, (0, 0, 0, slots - length))


class MemoryAttentionObjective(Objective):
    metric_names = ("loss", "cosine")
    perplexity = False

    def check_model(self, model) -> None:
        require_methods(model, self.config.name, "encode", "initial_memory", "update_memory")
        self.config.tokens.require(self.config.name, "pad")

    def losses(self, model, batch):
        ids = batch["input_ids"]  # (B, N, L) conversations
        pad_mask = ids != self.config.tokens.pad
        memory = model.initial_memory(ids.size(0), device=ids.device)  # (n_layers, B, S, d)
        cosines = []
        for turn in range(ids.size(1)):
            with torch.no_grad():
                encoded = model.encode(ids[:, turn], pad_mask[:, turn], memory=memory).layers
            new_memory = model.update_memory(memory, encoded, pad_mask[:, turn])
            weight = self.config.new_data_weight(turn)
            new_data = on_slots(encoded, pad_mask[:, turn], memory.size(2))
            label = weight * new_data + (1 - weight) * memory
            cosines.append(F.cosine_similarity(new_memory.float(), label.float(), dim=-1).mean())
            memory = new_memory.detach()
        cosine = torch.stack(cosines).mean()
        weight = torch.tensor(ids.size(0), device=ids.device)
        return {"loss": (-cosine, weight), "cosine": (cosine.detach(), weight)}

    def training_step(self, model, batch, step) -> StepOutput:
        values = self.losses(model, batch)
        return StepOutput(values["loss"][0], {name: v for name, (v, _) in values.items()})

    def evaluation_step(self, model, batch, index, scores):
        return self.losses(model, batch)


OBJECTIVES.register("rxt_memory", MemoryAttentionConfig)(MemoryAttentionObjective)
