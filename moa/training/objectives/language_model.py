"""`objective=lm`: next-token cross-entropy of a decoder-only model (the default), plus the
model's auxiliary losses (routers' balance, regularisers). On data=dialogue_recall's views
`current` and `history` it is the floor and the ceiling of the recall task."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moa.errors import ConfigError
from moa.models.language_model import LanguageModel, ModelOutput
from moa.training.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    StepOutput,
    token_metrics,
)
from moa.training.objectives.scores import ConversationScores


@dataclass
class LanguageModelObjectiveConfig(ObjectiveConfig):
    name: str = "lm"


def scored_forward(model: torch.nn.Module,
                   batch: dict[str, torch.Tensor]) -> tuple[ModelOutput, torch.Tensor]:
    """The model's output and the labels it is scored on. With `scored_positions` (B, K) in
    the batch (mqar), logits and labels are those positions' only: (B, K, V), (B, K)."""
    positions = batch.get("scored_positions")
    output = model(batch["input_ids"], output_positions=positions)
    labels = batch["labels"] if positions is None else batch["labels"].gather(1, positions)
    return output, labels


class LanguageModelObjective(Objective):
    prints_samples = True
    def check_model(self, model: torch.nn.Module) -> None:
        if not isinstance(model, LanguageModel):
            raise ConfigError("objective", "lm", "mlm | rxt_joint | rxt_sft | rxt_memory | "
                              f"rxt_smat for {type(model).__name__}", "lm trains a decoder-only "
                              "language model")

    def training_step(self, model, batch, step) -> StepOutput:
        output, labels = scored_forward(model, batch)
        loss, acc, _ = token_metrics(output.logits, labels)
        total = loss if output.aux_loss is None else loss + output.aux_loss
        logs = {"loss": loss, "acc": acc, "ppl": loss.exp()}
        logs |= {f"aux/{name}": value for name, (value, _weight) in output.aux_losses.items()}
        logs |= {f"stats/{name}": value for name, value in output.stats.items()}
        if output.aux_loss is not None:
            logs["total_loss"] = total
        return StepOutput(total, logs, ("loss", "acc", "ppl"))

    def evaluation_step(self, model, batch, index, scores: ConversationScores):
        output, labels = scored_forward(model, batch)
        loss, acc, count = token_metrics(output.logits, labels)
        if "distance" in batch:
            scores.update(output.logits, labels, batch["turn"], batch["distance"])
        return {"loss": (loss, count), "acc": (acc, count)}


OBJECTIVES.register("lm", LanguageModelObjectiveConfig)(LanguageModelObjective)
