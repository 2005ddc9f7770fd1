"""The triangle-inequality penalty: zero on a metric, the exact excess where d violates it.
The ball target: the radius that keeps the target fraction of each head's keys."""

from __future__ import annotations

import torch

from moa.layers.regularizers import ball_target_log_radius, triangle_inequality_penalty


def test_euclidean_distance_never_violates():
    torch.manual_seed(0)
    points = torch.randn(4, 50, 16, requires_grad=True)
    penalty, violating = triangle_inequality_penalty(points, n_samples=500)
    assert penalty.item() < 1e-6
    assert violating.item() == 0.0
    penalty.backward()  # repeated points (zero distances) must not poison the gradient
    assert torch.isfinite(points.grad).all()


def test_squared_distance_violates_with_the_exact_excess():
    """Collinear points 0, 1, 2 under d^2: d^2(0, 2) = 4 > d^2(0, 1) + d^2(1, 2) = 2 — why
    the penalty must use the distance, not the squared distance the score uses."""
    line = torch.tensor([[[0.0], [1.0], [2.0]]], requires_grad=True)  # (H=1, N=3, D=1)

    def squared(a, b):
        return (a - b).pow(2).sum(-1)

    torch.manual_seed(1)
    penalty, violating = triangle_inequality_penalty(line, 2000, squared)
    torch.manual_seed(1)  # the same draw, replayed
    index = torch.randint(0, 3, (1, 6000, 1))
    a, b, c = line.detach()[0, index[0, :, 0], 0].chunk(3)
    excess = (a - c).pow(2) - (a - b).pow(2) - (b - c).pow(2)
    torch.testing.assert_close(penalty, excess.clamp(min=0).mean())
    torch.testing.assert_close(violating, (excess > 1e-6 * ((a - b).pow(2) + (b - c).pow(2)))
                               .float().mean())
    assert violating > 0
    penalty.backward()
    assert line.grad.abs().sum() > 0


def test_ball_target_radius_keeps_the_target_fraction_of_each_head():
    """distance (B=2, H=3, S=10): the target radius is the 6th smallest of each head's 20
    distances, which keeps 0.3 of them."""
    torch.manual_seed(2)
    distance = torch.rand(2, 3, 10, dtype=torch.float64) + 0.1
    log_target = ball_target_log_radius(distance, kept=0.3)
    sixth = distance.transpose(0, 1).reshape(3, -1).sort(dim=1).values[:, 5]  # (H,)
    torch.testing.assert_close(log_target, sixth.log())
    inside = distance <= log_target.exp()[None, :, None]
    assert (inside.double().mean((0, 2)) == 0.3).all()


def test_ball_target_of_the_extreme_fractions_is_the_nearest_and_the_farthest_key():
    """A fraction below one key keeps the nearest key (rank 1, not 0); all keeps the
    farthest."""
    torch.manual_seed(3)
    distance = torch.rand(2, 3, 10, dtype=torch.float64) + 0.1
    per_head = distance.transpose(0, 1).reshape(3, -1)  # (H, B * S)
    torch.testing.assert_close(ball_target_log_radius(distance, kept=0.01),
                               per_head.min(1).values.log())
    torch.testing.assert_close(ball_target_log_radius(distance, kept=1.0),
                               per_head.max(1).values.log())


def test_the_distance_is_the_euclidean_norm_over_channels():
    from moa.layers.regularizers import euclidean

    torch.manual_seed(4)
    a, b = torch.randn(2, 3, 5, 7, dtype=torch.float64).unbind(0)  # (H, n, D) each
    torch.testing.assert_close(euclidean(a, b), ((a - b) ** 2).sum(-1).sqrt())


def test_violations_are_relative_to_the_sides():
    """Collinear points thousands apart: float32 rounds d(a, c) - d(a, b) - d(b, c) to a few
    thousandths, which is no violation (below 1e-6 of the sides)."""
    torch.manual_seed(5)
    direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
    points = torch.rand(1, 200, 1) * 1e4 * direction  # (H=1, N, D) on a line
    _, violating = triangle_inequality_penalty(points, n_samples=4000)
    assert violating.item() == 0.0
