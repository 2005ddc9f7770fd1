"""The triangle-inequality penalty: zero on a metric, the exact excess where d violates it.
The ball target: zero at the radius that keeps the target fraction, pulling toward it."""

from __future__ import annotations

import torch

from moa.layers.regularizers import ball_target_penalty, triangle_inequality_penalty


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


def test_ball_target_is_zero_at_the_radius_keeping_the_target_and_pulls_toward_it():
    """distance (B=2, H=3, S=10): at r_h = the 6th smallest of the head's 20 distances the
    ball keeps 0.3 of them and the penalty is 0; a larger radius is pulled down, a smaller
    one up, with gradient 2 (log r - log r*) / H per head."""
    torch.manual_seed(2)
    distance = torch.rand(2, 3, 10, dtype=torch.float64) + 0.1
    sixth = distance.transpose(0, 1).reshape(3, -1).sort(dim=1).values[:, 5]  # (H,)
    assert ((distance <= sixth[None, :, None]).double().mean((0, 2)) == 0.3).all()
    at_target = sixth.log().requires_grad_()
    penalty, gap = ball_target_penalty(distance, at_target, kept=0.3)
    assert penalty.item() == 0.0 and gap.item() == 0.0
    offset = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    log_radius = (sixth.log() + offset).requires_grad_()
    penalty, gap = ball_target_penalty(distance, log_radius, kept=0.3)
    penalty.backward()
    torch.testing.assert_close(penalty.detach(), offset.pow(2).mean())
    torch.testing.assert_close(log_radius.grad, 2 * offset / 3)
    torch.testing.assert_close(gap, offset.mean())
