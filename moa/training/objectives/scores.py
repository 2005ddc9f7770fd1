"""Scores of conversations by turn and by the distance d of each question (dialogue_recall).

An answer is right when every one of its labelled tokens has the largest logit (teacher
forcing, `label_is_top`): the answer's words and its `<|eos|>`. `recall_by_distance[d]` is
the fraction of questions about a fact stated d turns before that are answered right; per
turn, the loss and token accuracy of the answers and the fraction of answers right.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from moa.training.objectives.base import IGNORE_INDEX, label_is_top


class ConversationScores:
    """Sums over evaluation batches; `results()` gives the means, `reset()` starts afresh."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    def update(self, logits: torch.Tensor, labels: torch.Tensor, turn: torch.Tensor,
               distance: torch.Tensor) -> None:
        """logits (B, T, V); labels, turn (B, T): each position's turn (-1: none);
        distance (B, N): the d of each turn's question (0: no question)."""
        labelled = (labels != IGNORE_INDEX) & (turn >= 0)  # (B, T)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        correct = label_is_top(logits, labels)
        turns = distance.size(1)
        slot = torch.arange(len(labels), device=labels.device)[:, None] * turns + turn.clamp(min=0)
        tokens = torch.zeros(distance.numel(), device=labels.device)
        wrong = torch.zeros_like(tokens)
        loss = torch.zeros_like(tokens)
        tokens.index_add_(0, slot[labelled], torch.ones_like(losses[labelled]))
        wrong.index_add_(0, slot[labelled], (~correct[labelled]).float())
        loss.index_add_(0, slot[labelled], losses[labelled])
        answered = tokens > 0  # (B * N,) the answers present in this batch
        right = answered & (wrong == 0)
        turn_of_slot = torch.arange(turns, device=labels.device).repeat(len(labels))
        for name, values, index in (
                ("tokens_by_turn", tokens, turn_of_slot), ("wrong_by_turn", wrong, turn_of_slot),
                ("loss_by_turn", loss, turn_of_slot),
                ("answers_by_turn", answered.float(), turn_of_slot),
                ("right_by_turn", right.float(), turn_of_slot),
                ("answers_by_distance", answered.float(), distance.flatten()),
                ("right_by_distance", right.float(), distance.flatten())):
            totals = torch.zeros(int(index.max()) + 1, device=labels.device).index_add_(
                0, index, values)
            for key, total in enumerate(totals.tolist()):
                self.sums[name][key] += total

    def results(self) -> dict[str, dict[int, float]]:
        """recall_by_distance {d >= 1: accuracy}, answers_by_distance {d: count},
        loss_by_turn, acc_by_turn (tokens), answer_acc_by_turn {turn: value}."""
        s = self.sums
        distances = [d for d, n in sorted(s["answers_by_distance"].items()) if d > 0 and n > 0]
        turns = [t for t, n in sorted(s["tokens_by_turn"].items()) if n > 0]
        return {
            "recall_by_distance": {d: s["right_by_distance"][d] / s["answers_by_distance"][d]
                                   for d in distances},
            "answers_by_distance": {d: int(s["answers_by_distance"][d]) for d in distances},
            "loss_by_turn": {t: s["loss_by_turn"][t] / s["tokens_by_turn"][t] for t in turns},
            "acc_by_turn": {t: 1 - s["wrong_by_turn"][t] / s["tokens_by_turn"][t] for t in turns},
            "answer_acc_by_turn": {t: s["right_by_turn"][t] / s["answers_by_turn"][t]
                                   for t in turns},
        }
