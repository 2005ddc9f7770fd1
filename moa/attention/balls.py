"""Ball pruning: each key head keeps only the keys inside a learned ball.

Key head h has an origin o_h and a radius r_h in its metric space; a key with
`||k - o_h|| > r_h` is masked out before the softmax (the attention kernels still keep
each query's own key, so no row is empty). The mask is hard in the forward pass.

A hard mask gives r_h no gradient, so the gate is a straight-through estimator with a
hard-sigmoid surrogate of relative width `band`:

    hard_j = [d_j <= r]                       d_j = ||k_j - o||
    soft_j = clamp(1/2 + (r - d_j) / (band * r), 0, 1)
    gate_j = hard_j + soft_j - stop_gradient(soft_j)

The forward value is exactly `hard_j`; the backward pass uses `d soft_j`, so r, o and the
keys receive `dL/dgate_j * d soft_j`, where `dL/dgate_j` is the derivative of the
attention output with respect to key j's multiplicative weight (defined for pruned keys
too: how much the loss would change if key j were let back in). For a pruned key that
derivative weighs each query by `exp(s_ij - lse_i)`, the probability the key would take,
which has no bound when it outscores the kept keys; the kernels cap it at 1
(`moa/kernels/metric_reference.py`). Uncapped, a radius held at half the keys by
`ball_target_kept` pruned such keys in every batch, and the default run broke
(docs/results.md). Only keys within
`band * r / 2` of the sphere carry gradient, so a key far outside the ball costs nothing
in the backward pass either: the gate says which keys those are (`BallGate.band`), and the
fused kernels compute the gate's gradient at the kept and band keys only, skipping the far
ones (`moa/kernels/pruned_attention.py`). `learn_radius: false` keeps the radius fixed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from moa.layers.kept import KeptValues


class BallGate(NamedTuple):
    """A ball's verdict on each key of each key head."""

    gate: torch.Tensor  # (B, H, S): exactly 0 or 1 forward, straight-through gradient
    # (B, H, S) bool: keys whose gate has a gradient (near the sphere); None where nothing
    # needs a gradient (the gate is then the hard mask alone)
    band: torch.Tensor | None

    def pruned_fraction(self) -> torch.Tensor:
        """The fraction of the keys pruned, a detached scalar: made only where it is
        recorded (a decoding step would pay two ops a path for it)."""
        return 1.0 - self.gate.detach().mean()


class BallPruning(nn.Module):
    def __init__(self, n_heads: int, head_dim: int, radius_init: float, learn_radius: bool,
                 origin_init_scale: float, band: float) -> None:
        super().__init__()
        self.band = band
        self.origin = nn.Parameter(torch.randn(n_heads, head_dim) * origin_init_scale)
        log_radius = torch.full((n_heads,), math.log(radius_init))
        if learn_radius:
            self.log_radius = nn.Parameter(log_radius)
        else:
            self.register_buffer("log_radius", log_radius)
        self.kept = KeptValues()  # the radii and origins between decoding steps

    @property
    def radius(self) -> torch.Tensor:
        return self.log_radius.exp()  # (H,), positive

    def distance(self, k: torch.Tensor) -> torch.Tensor:
        """||k - o_h||: k (B, H, S, D) -> (B, H, S)."""
        return _distance(k, self._shaped(k.dtype)[1])

    def forward(self, k: torch.Tensor) -> BallGate:
        """k: (B, H, S, D) keys in metric space -> the gate (B, H, S) with hard values and
        straight-through gradients, and its band."""
        radius, origin = self._shaped(k.dtype)  # (1, H, 1), (1, H, 1, D)
        distance = _distance(k, origin)  # (B, H, S)
        hard = (distance <= radius).to(k.dtype)
        if not torch.is_grad_enabled() or not any(
                x.requires_grad for x in (k, self.log_radius, self.origin)):
            return BallGate(hard, None)  # inference: the mask alone
        soft = (0.5 + (radius - distance) / (self.band * radius)).clamp(0.0, 1.0)
        band = (soft > 0) & (soft < 1)  # where soft has a slope: |d - r| < band * r / 2
        return BallGate(hard + (soft - soft.detach()), band.detach())

    def _shaped(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The radii (1, H, 1) and origins (1, H, 1, D) in `dtype`, to broadcast over keys;
        kept between calls without autograd (`KeptValues`)."""
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            return (self.radius.view(1, -1, 1).to(dtype),
                    self.origin[None, :, None, :].to(dtype))

        return self.kept.get(f"shaped {dtype}", (self.log_radius, self.origin), compute)


def _distance(k: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """||k - o_h||: k (B, H, S, D), origin (1, H, 1, D) -> (B, H, S)."""
    return (k - origin).norm(dim=-1)
