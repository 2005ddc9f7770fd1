"""Regularisers: pure functions from a layer's tensors to a scalar penalty and its stats.

The triangle-inequality (TI) penalty samples triples (a, b, c) of points of one head and
penalises `relu(d(a, c) - d(a, b) - d(b, c))`. For metric attention `d` is the head's
distance, *not* the squared distance the score uses: `s = -alpha d^2`, and d^2 itself is
no metric (three collinear points at 0, 1, 2 give d^2(a, c) = 4 > 1 + 1), so penalising
the square would push every head away from Euclidean geometry. Under the l2, cosine and
diagonal Mahalanobis metrics d is a true metric and the penalty stays at rounding level;
it guards heads whose distance could violate the inequality, and its violating fraction
is a check on the geometry.

The ball target (metric attention's `ball_target_kept`) moves each ball's radius toward
r*_h, the `kept` quantile of its head's key distances in the batch
(`ball_target_log_radius`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (..., D) x2 -> (...)


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The distance of every metric-attention head, in its metric space (not squared)."""
    return (a - b).norm(dim=-1)


def triangle_inequality_penalty(points: torch.Tensor, n_samples: int,
                                distance: Distance = euclidean
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """points: (H, N, D), each head's points (its queries and keys in metric space).

    Returns the penalty (mean over heads and `n_samples` random triples per head of
    `relu(d(a,c) - d(a,b) - d(b,c))`, differentiable) and the fraction of triples that
    violate the inequality by more than 1e-6 of their sides (a detached scalar).
    """
    H, N, D = points.shape
    index = torch.randint(0, N, (H, 3 * n_samples, 1), device=points.device)
    a, b, c = points.gather(1, index.expand(-1, -1, D)).chunk(3, dim=1)  # (H, n, D) each
    ab, bc, ac = distance(a, b), distance(b, c), distance(a, c)  # (H, n)
    excess = ac - ab - bc
    violating = (excess > 1e-6 * (ab + bc)).float().mean()
    return torch.relu(excess).mean(), violating.detach()


def ball_target_log_radius(distance: torch.Tensor, kept: float) -> torch.Tensor:
    """distance (B, H, S): each key's distance from its head's ball origin -> log r*_h (H,),
    the log of the smallest radius that keeps a fraction `kept` of the head's keys in the
    batch (detached: a target, not a path for gradients)."""
    H = distance.size(1)
    per_head = distance.detach().transpose(0, 1).reshape(H, -1)  # (H, B * S)
    rank = max(1, math.ceil(kept * per_head.size(1)))
    target = per_head.kthvalue(rank, dim=1).values
    return target.clamp_min(torch.finfo(per_head.dtype).tiny).log()

