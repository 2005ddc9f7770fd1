"""Conversation scores (moa/training/objectives/scores.py): an answer is right only when all
its tokens are, and each counts under its turn and its question's distance."""

from __future__ import annotations

import pytest
import torch

from moa.training.objectives.scores import IGNORE_INDEX, ConversationScores

V = 7


def logits_predicting(predicted: list[list[int]]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), V).float() * 10


def test_recall_by_distance_and_by_turn_on_a_hand_made_batch():
    # two conversations of 3 turns, laid back to back (view=history): turn of each position
    turn = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, -1], [0, 0, 1, 1, 1, 2, 2, 2, 2]])
    labels = torch.tensor([[5, IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 6, 1,
                            IGNORE_INDEX],
                           [2, IGNORE_INDEX, 3, 3, IGNORE_INDEX, IGNORE_INDEX, 4, 4, 1]])
    predicted = labels.clamp(min=0).tolist()
    predicted[0][4] = 0  # conversation 0, turn 1: one of its two tokens wrong
    predicted[1][8] = 0  # conversation 1, turn 2: its last token wrong
    distance = torch.tensor([[0, 1, 2], [0, 1, 1]])
    scores = ConversationScores()
    scores.update(logits_predicting(predicted), labels, turn, distance)
    results = scores.results()
    # d=1: conv 0 turn 1 (wrong), conv 1 turn 1 (right), conv 1 turn 2 (wrong); d=2: right
    assert results["recall_by_distance"] == {1: pytest.approx(1 / 3), 2: 1.0}
    assert results["answers_by_distance"] == {1: 3, 2: 1}
    assert results["answer_acc_by_turn"] == {0: 1.0, 1: 0.5, 2: 0.5}
    assert results["acc_by_turn"] == {0: 1.0, 1: pytest.approx(3 / 4), 2: pytest.approx(4 / 5)}
    assert 0 < results["loss_by_turn"][1] and results["loss_by_turn"][0] < 1e-3


def test_sums_run_over_batches_until_reset():
    labels = torch.tensor([[1, 2], [1, 2]])
    turn = torch.tensor([[1, 1], [1, 1]])
    distance = torch.tensor([[0, 1], [0, 1]])
    scores = ConversationScores()
    scores.update(logits_predicting([[1, 2], [1, 0]]), labels, turn, distance)
    scores.update(logits_predicting([[1, 2], [1, 2]]), labels, turn, distance)
    assert scores.results()["recall_by_distance"] == {1: 0.75}
    scores.reset()
    assert scores.results()["recall_by_distance"] == {}
