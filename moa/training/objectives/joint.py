"""`objective=rxt_joint` and `objective=rxt_sft`: the Reactive Transformer's joint LM
training (stages 1 and 2 of Reactive AI's supervised curriculum).

The encoder reads the masked input and its MLM head is scored on the masked positions; the
decoder reads the unmasked input, its memory cross-attention reading the encoder's layer
outputs, detached, in place of the short-term memory (one per decoder layer); it is scored
on the batch's labels (the next tokens, or the answers of `[Q] query [A] answer`
interactions). loss = MLM + AR. rxt_sft is the same step on interaction data.
"""

from __future__ import annotations

from dataclasses import dataclass

from moa.training.objectives.base import OBJECTIVES, StepOutput, require_methods, token_metrics
from moa.training.objectives.masked_lm import (
    EVALUATION_SEED,
    MaskedLanguageModelConfig,
    MaskedLanguageModelObjective,
)


@dataclass
class JointConfig(MaskedLanguageModelConfig):
    name: str = "rxt_joint"


@dataclass
class InteractionSFTConfig(MaskedLanguageModelConfig):
    name: str = "rxt_sft"


class JointObjective(MaskedLanguageModelObjective):
    """loss = MLM loss + AR loss; acc: the decoder's next-token accuracy."""

    metric_names = ("loss", "acc", "mlm_loss", "mlm_acc", "ar_loss")
    perplexity = False  # of MLM + AR: no perplexity

    def check_model(self, model) -> None:
        super().check_model(model)
        require_methods(model, self.config.name, "decode")

    def losses(self, model, batch, seed: int):
        ids = batch["input_ids"]  # (B, L)
        encoded, mlm_loss, mlm_acc, mlm_count = self.mlm(model, ids, seed)
        memory = encoded.layers.detach()  # (n_layers, B, L, d): the STM of this stage
        logits = model.decode(ids, memory, memory_mask=ids != self.config.tokens.pad)
        ar_loss, ar_acc, ar_count = token_metrics(logits, batch["labels"])
        return {"loss": (mlm_loss + ar_loss, ar_count), "acc": (ar_acc, ar_count),
                "mlm_loss": (mlm_loss, mlm_count), "mlm_acc": (mlm_acc, mlm_count),
                "ar_loss": (ar_loss, ar_count)}

    def training_step(self, model, batch, step) -> StepOutput:
        values = self.losses(model, batch, self.config.seed + step)
        return StepOutput(values["loss"][0], {name: v for name, (v, _) in values.items()},
                          ("loss", "acc", "mlm_acc"))

    def evaluation_step(self, model, batch, index, scores):
        return self.losses(model, batch, self.config.seed + EVALUATION_SEED + index)


OBJECTIVES.register("rxt_joint", JointConfig)(JointObjective)
OBJECTIVES.register("rxt_sft", InteractionSFTConfig)(JointObjective)
