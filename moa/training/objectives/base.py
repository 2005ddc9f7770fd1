"""What every objective shares: its config, the special tokens it reads, its step output,
and the registry `objective.name` picks from.

An objective turns a batch into a loss and the metrics logged beside it. The Lightning
module (moa/training/lit.py) only wires it to the trainer: the math of each training stage
lives in its own module here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moa.errors import ConfigError
from moa.registry import Registry

if TYPE_CHECKING:
    from moa.data.tokenizer import Tokenizer
    from moa.training.objectives.scores import ConversationScores

IGNORE_INDEX = -100  # labels that carry no loss


@dataclass
class SpecialTokens:
    """The token ids an objective reads, from the run's tokenizer (None: it has no such token)."""

    pad: int | None = None
    eos: int | None = None
    query: int | None = None  # [Q]
    answer: int | None = None  # [A]
    mask: int | None = None  # [MASK]
    special: list[int] = field(default_factory=list)  # every special id: never masked
    vocab_size: int | None = None

    @classmethod
    def of(cls, tokenizer: Tokenizer | None) -> SpecialTokens:
        if tokenizer is None:
            return cls()
        ids = {name: tokenizer.token_to_id(token) for name, token in
               (("query", "[Q]"), ("answer", "[A]"), ("mask", "[MASK]"))}
        return cls(pad=tokenizer.pad_id, eos=tokenizer.eos_id, special=tokenizer.special_ids,
                   vocab_size=tokenizer.vocab_size, **ids)

    def require(self, objective: str, *names: str) -> None:
        """A ConfigError naming the tokenizer where it lacks a token `objective` reads."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ConfigError("tokenizer", f"without {missing}", "a tokenizer with [Q], [A], "
                              "[MASK] (tokenizer=rxt_bpe, or tokenizer.special_tokens=[...])",
                              f"objective={objective} needs them")


@dataclass
class ObjectiveConfig:
    """Fields every objective config has; each objective subclasses it and sets its `name`."""

    name: str
    tokens: SpecialTokens = field(default_factory=SpecialTokens)  # set from the run's tokenizer
    seed: int = 0  # set to the run's seed: the objective's own draws (masks) start from it


@dataclass
class StepOutput:
    """A training step's loss, the values to log under train/ and those shown in the bar."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]
    progress_bar: tuple[str, ...] = ("loss",)


class Objective(ABC):
    """One training stage's loss. `metric_names` are the token-weighted means the
    evaluation reports per split (the first is `loss`); `perplexity`: whether `loss` is a
    cross-entropy whose exponential means something."""

    metric_names: tuple[str, ...] = ("loss", "acc")
    perplexity: bool = True
    prints_samples: bool = False  # whether the run's prompts are continued after evaluation

    def __init__(self, config: ObjectiveConfig) -> None:
        self.config = config

    def check_model(self, model: torch.nn.Module) -> None:  # noqa: B027 (a hook)
        """A ConfigError (before training) where `model` lacks what this objective calls."""

    def on_train_step_start(self, model: torch.nn.Module, progress: float) -> None:  # noqa: B027
        """Called before every training step, `progress` the fraction of training done."""

    @abstractmethod
    def training_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      step: int) -> StepOutput:
        """The loss of one training batch and what to log beside it."""

    @abstractmethod
    def evaluation_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        index: int, scores: ConversationScores
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """metric name -> (value, weight) for one evaluation batch; conversations' answers
        go to `scores` (their turn and distance)."""


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean cross-entropy, accuracy and number of labelled tokens. (B, T, V), (B, T)."""
    mask = labels != IGNORE_INDEX
    count = mask.sum()
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX)
    correct = label_is_top(logits, labels).sum()  # False at IGNORE_INDEX
    return loss, correct.float() / count.clamp(min=1), count


def label_is_top(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each label's logit is its row's largest: (..., V), (...) -> bool (...);
    False at IGNORE_INDEX. A tie for the largest counts as right, where `argmax == label`
    would count it right only if the label came first. The same test, as a max and a
    gather: on CPU PyTorch's argmax over a vocabulary is not vectorised, and costs many
    times the max."""
    label_logits = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (label_logits >= logits.amax(-1)) & (labels != IGNORE_INDEX)


def require_methods(model: torch.nn.Module, objective: str, *names: str) -> None:
    missing = [name for name in names if not callable(getattr(model, name, None))]
    if missing:
        raise ConfigError("objective", objective, "an objective the model supports (lm for "
                          "decoder-only models; mlm, rxt_* for model=rxt_alpha_micro)",
                          f"{type(model).__name__} has no {', '.join(missing)}")


# builder(config) -> Objective
OBJECTIVES: Registry[Objective] = Registry("objective")
