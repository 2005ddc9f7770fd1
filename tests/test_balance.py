"""Balance losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from moa.layers import balance


def test_mse_uniform_by_hand():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # mean (0.75, 0.25)
    assert balance.mse_uniform(probs).item() == pytest.approx((0.25**2 + 0.25**2) / 2)
    assert balance.mse_uniform(torch.full((2, 5, 4), 0.25)).item() == 0.0


def test_switch_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    top1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # f = (1, 0), P = (0.65, 0.35)
    assert balance.switch(probs, top1).item() == pytest.approx(2 * 0.65)
    top2_of_3 = torch.tensor([[1.0, 1.0, 0.0]])  # f = (1/2, 1/2, 0)
    value = balance.switch(torch.tensor([[0.5, 0.3, 0.2]]), top2_of_3)
    assert value.item() == pytest.approx(3 * (0.5 * 0.5 + 0.5 * 0.3))


def test_switch_is_one_under_uniform_routing_and_grows_with_collapse():
    probs = torch.full((6, 3), 1 / 3)
    dispatch = torch.eye(3).repeat(2, 1)
    assert balance.switch(probs, dispatch).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[0.9, 0.05, 0.05]]).repeat(6, 1)
    assert balance.switch(collapsed, torch.tensor([[1.0, 0, 0]]).repeat(6, 1)).item() > 2.5


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert balance.z_loss(logits).item() == pytest.approx(expected)


def test_gradients_push_towards_balance():
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    probs = logits.softmax(-1)
    grad, = torch.autograd.grad(balance.mse_uniform(probs), logits)
    assert (grad[:, 0] > 0).all() and (grad[:, 1] < 0).all()  # descent lowers the favourite


def test_losses_over_batch_time_and_paths_by_loops():
    """(B, T, n) router outputs, as a mixture gives them, against loops over the tokens:
    each loss reduces over the paths (the last axis) and averages over every token. Square
    (N, n) inputs would not tell the axes apart."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    probs = logits.softmax(-1)
    dispatch = torch.nn.functional.one_hot(probs.argmax(-1), 3).double()
    tokens = [(b, t) for b in range(2) for t in range(5)]
    z = sum(math.log(sum(math.exp(v) for v in logits[b, t].tolist())) ** 2 for b, t in tokens)
    assert balance.z_loss(logits).item() == pytest.approx(z / len(tokens))
    mean = [sum(probs[b, t, i].item() for b, t in tokens) / len(tokens) for i in range(3)]
    fraction = [sum(dispatch[b, t, i].item() for b, t in tokens) / len(tokens) for i in range(3)]
    switch = 3 * sum(f * p for f, p in zip(fraction, mean, strict=True))
    assert balance.switch(probs, dispatch).item() == pytest.approx(switch)
    mse = sum((p - 1 / 3) ** 2 for p in mean) / 3
    assert balance.mse_uniform(probs).item() == pytest.approx(mse)
