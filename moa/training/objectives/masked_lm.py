"""`objective=mlm`: masked language modelling of an encoder with its MLM head.

The model needs `encode(ids, pad_mask) -> EncoderOutput(hidden, layers)` and
`mlm_logits(hidden)` (the Reactive Transformer's encoder, any attention preset). Masking
(moa/data/masking.py) draws from a generator seeded by (run seed, step): a resumed run
masks exactly as the uninterrupted one would; evaluation batch i always gets the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moa.data.masking import MaskingConfig, mask_tokens
from moa.training.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    StepOutput,
    require_methods,
    token_metrics,
)

EVALUATION_SEED = 1 << 20  # evaluation masks: their own stream, apart from training steps'


@dataclass
class MaskedLanguageModelConfig(ObjectiveConfig):
    name: str = "mlm"
    masking: MaskingConfig = field(default_factory=MaskingConfig)


class MaskedLanguageModelObjective(Objective):
    """loss = cross-entropy of the MLM head on the masked positions; acc likewise."""

    metric_names = ("loss", "acc", "mlm_loss", "mlm_acc")

    def check_model(self, model: torch.nn.Module) -> None:
        require_methods(model, self.config.name, "encode", "mlm_logits")
        self.config.tokens.require(self.config.name, "mask", "pad")

    def masked(self, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.config.tokens
        generator = torch.Generator().manual_seed(seed)
        special = torch.tensor(tokens.special, device=ids.device)
        return mask_tokens(ids, special, tokens.mask, tokens.vocab_size, self.config.masking,
                           generator)

    def mlm(self, model: torch.nn.Module, ids: torch.Tensor, seed: int):
        """(encoder output of the masked ids, MLM loss, accuracy, count); ids (B, L)."""
        corrupted, labels = self.masked(ids, seed)
        encoded = model.encode(corrupted, ids != self.config.tokens.pad)
        loss, acc, count = token_metrics(model.mlm_logits(encoded.hidden), labels)
        return encoded, loss, acc, count

    def training_step(self, model, batch, step) -> StepOutput:
        _, loss, acc, _ = self.mlm(model, batch["input_ids"], self.config.seed + step)
        return StepOutput(loss, {"loss": loss, "acc": acc, "mlm_loss": loss, "mlm_acc": acc},
                          ("loss", "acc"))

    def evaluation_step(self, model, batch, index, scores):
        seed = self.config.seed + EVALUATION_SEED + index
        _, loss, acc, count = self.mlm(model, batch["input_ids"], seed)
        return {name: (value, count) for name, value in
                (("loss", loss), ("acc", acc), ("mlm_loss", loss), ("mlm_acc", acc))}


OBJECTIVES.register("mlm", MaskedLanguageModelConfig)(MaskedLanguageModelObjective)
