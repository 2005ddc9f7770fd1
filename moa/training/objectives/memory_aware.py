"""`objective=rxt_smat`: supervised memory-aware training (stage 4) on conversations.

For each conversation (B, N, L): the decoder answers turn 0 reading the initial STM; then
for t = 1..N-1 the encoder encodes turn t-1's interaction `[Q] query [A] answer` (reading
the STM where it has memory cross-attention), the memory attention writes it into the
STM, and the decoder answers turn t reading the STM. loss = the decoder's cross-entropy
over every turn's labels; gradients flow back through the chain of writes. Evaluation
also scores the answers by turn and by the distance of their question
(moa/training/objectives/scores.py), and the encoder's MLM on the turns.

Parts are unfrozen gradually: `unfreeze` maps a glob over parameter names (the syntax of
`freeze`, moa/training/freeze.py) to the fraction of training from which they train; before
it they get no gradient, so the optimiser leaves them bitwise as they are.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from moa.errors import ConfigError
from moa.training.freeze import check_patterns
from moa.training.objectives.base import OBJECTIVES, StepOutput, require_methods, token_metrics
from moa.training.objectives.masked_lm import (
    EVALUATION_SEED,
    MaskedLanguageModelConfig,
    MaskedLanguageModelObjective,
)


@dataclass
class MemoryAwareConfig(MaskedLanguageModelConfig):
    name: str = "rxt_smat"
    # glob -> fraction of training from which it trains; parts not named train throughout
    unfreeze: dict[str, float] = field(default_factory=lambda: {"encoder.*": 0.5})

    def __post_init__(self) -> None:
        for pattern, start in self.unfreeze.items():
            if not isinstance(start, int | float) or not 0 <= start <= 1:
                raise ConfigError(f"unfreeze.{pattern}", start, "a fraction of training in [0, 1]")


class MemoryAwareObjective(MaskedLanguageModelObjective):
    metric_names = ("loss", "acc", "mlm_loss", "mlm_acc")

    def __init__(self, config: MemoryAwareConfig) -> None:
        super().__init__(config)
        self._scheduled: dict[str, list[torch.nn.Parameter]] | None = None

    def check_model(self, model) -> None:
        super().check_model(model)
        require_methods(model, self.config.name, "decode", "initial_memory", "update_memory")
        check_patterns(model, list(self.config.unfreeze), key="objective.unfreeze")

    def on_train_step_start(self, model, progress: float) -> None:
        if self._scheduled is None:  # each glob's parameters that `freeze` left trainable
            self._scheduled = {
                pattern: [p for name, p in model.named_parameters()
                          if fnmatch.fnmatchcase(name, pattern) and p.requires_grad]
                for pattern in self.config.unfreeze}
        for pattern, parameters in self._scheduled.items():
            trains = progress >= self.config.unfreeze[pattern]
            for parameter in parameters:
                parameter.requires_grad_(trains)

    def conversation(self, model, batch, scores=None):
        ids, labels = batch["input_ids"], batch["labels"]  # (B, N, L)
        pad_mask = ids != self.config.tokens.pad
        memory = model.initial_memory(ids.size(0), device=ids.device)
        losses, right, counts = [], [], []
        for turn in range(ids.size(1)):
            if turn > 0:
                encoded = model.encode(ids[:, turn - 1], pad_mask[:, turn - 1],
                                       memory=memory).layers
                memory = model.update_memory(memory, encoded, pad_mask[:, turn - 1])
            logits = model.decode(ids[:, turn], memory)  # (B, L, V)
            loss, acc, count = token_metrics(logits, labels[:, turn])
            losses.append(loss * count), right.append(acc * count), counts.append(count)
            if scores is not None:
                scores.update(logits, labels[:, turn], batch["turn"][:, turn], batch["distance"])
        count = torch.stack(counts).sum()
        return (torch.stack(losses).sum() / count.clamp(min=1),
                torch.stack(right).sum() / count.clamp(min=1), count)

    def training_step(self, model, batch, step) -> StepOutput:
        loss, acc, _ = self.conversation(model, batch)
        return StepOutput(loss, {"loss": loss, "acc": acc}, ("loss", "acc"))

    def evaluation_step(self, model, batch, index, scores):
        loss, acc, count = self.conversation(model, batch, scores)
        turns = batch["input_ids"].flatten(0, 1)  # (B * N, L): every interaction
        seed = self.config.seed + EVALUATION_SEED + index
        _, mlm_loss, mlm_acc, mlm_count = self.mlm(model, turns, seed)
        return {"loss": (loss, count), "acc": (acc, count), "mlm_loss": (mlm_loss, mlm_count),
                "mlm_acc": (mlm_acc, mlm_count)}


OBJECTIVES.register("rxt_smat", MemoryAwareConfig)(MemoryAwareObjective)
