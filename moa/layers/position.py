"""Position encodings: `learned` (absolute, added to the embeddings) | `rope` (rotary) |
`blackhole_rope` (rotary with learned frequencies and a bounded gate on the values).

One instance is shared by all layers. `embed` acts on the token embeddings; `rotate`
acts on each attention layer's queries and keys and `scale_values` on its values, before
they are cached (each is the identity where it does not apply). The queries' positions
are the keys' unless `query_positions` (B, K) says otherwise: a layer that computes a few
positions only (`ForwardContext.output_positions`) has queries at those.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moa.layers.kept import KeptValues
from moa.registry import Registry
from moa.schema import check

POSITION: Registry[nn.Module] = Registry("position")


class PositionEncoding(nn.Module):
    """Queries and keys at the same positions rotate alike (`rotate_keys` rotates either),
    which keeps every score a function of relative position."""

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def one_forward(self) -> AbstractContextManager:
        """Around one forward of a model, whose layers may then share the tables computed
        from its positions, with autograd too."""
        return nullcontext()

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
        query_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def scale_values(self, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return v

    def rotate_queries(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D) rotated to `positions` (T,) or (B, T), for keys that carry no
        position (cross-attention into a memory): `rotate` with no keys."""
        return self.rotate(q, q[..., :0, :], positions.new_empty(0), positions)[0]

    def rotate_keys(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """k (B, H, T, D) rotated to `positions` (T,): `rotate` with no queries (a decoding
        step of a path that only extends its cache)."""
        return k


@dataclass
class LearnedPositionConfig:
    name: str = "learned"


class LearnedPosition(PositionEncoding):
    def __init__(self, config: LearnedPositionConfig, max_seq_len: int, d_model: int,
                 head_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_seq_len, d_model)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.embedding(positions)  # (B, T, C) + (T, C)


@dataclass
class RotaryConfig:
    name: str = "rope"
    theta: float = 10000.0

    def __post_init__(self) -> None:
        check(self.theta > 0, "theta", self.theta, "a positive float")


class RotaryPosition(PositionEncoding):
    """RoFormer's rotation, in the half-split layout of GPT-NeoX and LLaMA."""

    def __init__(self, config: RotaryConfig, max_seq_len: int, d_model: int,
                 head_dim: int) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64),
                             rotary_frequencies(config.theta, head_dim))
        cos, sin = _half_split_tables(angles.cos().float(), angles.sin().float())
        self.register_buffer("cos", cos, persistent=False)  # (L, D)
        self.register_buffer("sin", sin, persistent=False)

    def angles(self, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The half-split tables at positions (T,) -> (T, D) x2, or (B, T) -> (B, 1, T, D)."""
        return _over_heads(self.cos[at], at), _over_heads(self.sin[at], at)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
        query_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_angles = self.angles(positions)  # (T, D) x2
        q_angles = k_angles if query_positions is None else self.angles(query_positions)
        return _rotate_half_split(q, *q_angles), _rotate_half_split(k, *k_angles)

    def rotate_keys(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return _rotate_half_split(k, *self.angles(positions))


@dataclass
class BlackHoleRoPEConfig:
    name: str = "blackhole_rope"
    theta_base: float = 10000.0  # RoPE's theta for the unperturbed frequencies
    r_basis: int = 4  # Fourier modes of each learned perturbation
    energy_amplification: float = 1.0  # A: the value gate is 2^(A tanh h), clamped to [1/2, 2]
    enable_v_energy: bool = True

    def __post_init__(self) -> None:
        check(self.theta_base > 0, "theta_base", self.theta_base, "a positive float")
        check(self.r_basis > 0, "r_basis", self.r_basis, "a positive integer")
        check(self.energy_amplification > 0, "energy_amplification", self.energy_amplification,
              "a positive float")


class BlackHoleRoPE(PositionEncoding):
    """RoPE whose frequencies learn a bounded perturbation, plus a bounded gate on values.

    With D = head_dim, i < D/2 a rotation pair, p a position, L = max_seq_len and
    F_R(x) = [1, cos(pi r x), sin(pi r x) for r = 1..R] (2R + 1 features, R = r_basis):

        omega_i  = theta_base^(-2i / D)                     RoPE's frequencies
        g_i      = a . F_R((i + 1/2) / (D/2))               a: (2R + 1,) learned
        phi(p,i) = p * omega_i * 2^tanh(g_i)                phase of pair i at position p
        q, k     rotated by phi in the half-split layout (as `rope`)
        h(p,c)   = F_R(2p / L) . b[:, c]                    b: (2R + 1, D) learned, c < D
        e(p,c)   = clamp(2^(A tanh h(p,c)), 1/2, 2)         A = energy_amplification
        v[..., p, c] <- e(p,c) * v[..., p, c]               only with enable_v_energy

    a and b start at zero, so the encoding starts as `rope` with theta = theta_base. The
    perturbation moves each frequency by at most one octave; the phase stays linear in p,
    so q and k keep their norms (a rotation) and q_m . k_n still depends on m - n only.
    The value gate is absolute: a learned amplitude per position and channel, shared by
    the heads, mode r making r periods over the L positions. It scales a value's energy by
    e(p,c)^2 in [1/4, 4]; the clamp bounds it whatever A is (for A <= 1 it never binds).
    Values are gated before they are cached, so cached decoding sees the same values.
    """

    def __init__(self, config: BlackHoleRoPEConfig, max_seq_len: int, d_model: int,
                 head_dim: int) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"blackhole_rope needs an even head_dim, got {head_dim}")
        half, features = head_dim // 2, 2 * config.r_basis + 1
        pairs = (torch.arange(half, dtype=torch.float64) + 0.5) / half
        self.register_buffer("frequencies", rotary_frequencies(config.theta_base, head_dim)
                             .float(), persistent=False)  # (D/2,)
        self.register_buffer("pair_features", fourier_features(pairs, config.r_basis).float(),
                             persistent=False)  # (D/2, 2R+1)
        self.phase_coefficients = nn.Parameter(torch.zeros(features))
        self.energy_coefficients = None
        if config.enable_v_energy:
            self.energy_coefficients = nn.Parameter(torch.zeros(features, head_dim))
        self.r_basis = config.r_basis
        self.max_seq_len = max_seq_len
        self.energy_amplification = config.energy_amplification
        self._tables = KeptValues()

    def one_forward(self) -> AbstractContextManager:
        return self._tables.one_forward()

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
        query_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_angles = self._kept("angles", positions, self.angles)
        q_angles = k_angles if query_positions is None else self.angles(query_positions)
        return _rotate_half_split(q, *q_angles), _rotate_half_split(k, *k_angles)

    def rotate_keys(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return _rotate_half_split(k, *self._kept("angles", positions, self.angles))

    def angles(self, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The half-split tables of phi(p, i) (`_half_split_tables`) at positions (T,) ->
        (T, D) x2, or (B, T) -> (B, 1, T, D) x2."""
        # Elementwise products, not matmuls: autocast would round the angles to bfloat16.
        shift = torch.tanh((self.pair_features * self.phase_coefficients).sum(-1))  # (D/2,)
        frequencies = self.frequencies * torch.exp2(shift)
        turns = _over_heads(at.float()[..., None] * frequencies, at)  # (T, D/2)
        return _half_split_tables(turns.cos(), turns.sin())

    def scale_values(self, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.energy_coefficients is None:
            return v
        gate = self._kept("energy_gate", positions, self.energy_gate)  # (T, D)
        return v * gate.to(v.dtype)  # (B, H, T, D) * (T, D)

    def _kept(self, name: str, positions: torch.Tensor, compute: Callable) -> Any:
        """compute(positions), kept while the same `positions` tensor comes back: every layer
        and every path of one forward encodes the same positions (a MoA decoding step
        computed these tables eight times). Without autograd, or with it within
        `one_forward` (`KeptValues`). The model makes a new positions tensor for each
        forward and never writes into it."""
        return self._tables.get(name, self._parameters.values(), lambda: compute(positions),
                                given=positions)

    def energy_gate(self, positions: torch.Tensor) -> torch.Tensor:
        """e(p, c) in [1/2, 2] for positions (T,) -> (T, D)."""
        at = positions.to(self.energy_coefficients.dtype)  # float64 in a float64 model
        features = fourier_features(2 * at / self.max_seq_len, self.r_basis)
        h = features @ self.energy_coefficients  # (T, D)
        return torch.exp2(self.energy_amplification * torch.tanh(h)).clamp(0.5, 2.0)


def fourier_features(x: torch.Tensor, modes: int) -> torch.Tensor:
    """[1, cos(pi r x), sin(pi r x) for r = 1..modes]: x (N,) -> (N, 2 * modes + 1)."""
    r = torch.arange(1, modes + 1, dtype=x.dtype, device=x.device)
    angles = torch.pi * x[:, None] * r  # (N, modes)
    return torch.cat([torch.ones_like(x)[:, None], angles.cos(), angles.sin()], dim=-1)


def rotary_frequencies(theta: float, head_dim: int) -> torch.Tensor:
    """RoPE's angular frequencies omega_i = theta^(-2i / D), i < D/2: (D/2,) float64."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def _over_heads(per_position: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Angles (T, D/2) as they are, or per batch row (B, K, D/2) -> (B, 1, K, D/2), to
    broadcast over (B, H, T, D/2) heads."""
    return per_position if positions.dim() == 1 else per_position[:, None]


def _half_split_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles (..., D/2) -> [cos, cos] and [-sin, sin] (..., D): the
    rotation of the half-split layout as two products with the whole head."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def _rotate_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]: the halves swapped
    by a roll, so four ops rather than the halves' eight, with the same roundings."""
    swapped = x.roll(x.size(-1) // 2, dims=-1)  # [x2, x1]
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


POSITION.register("learned", LearnedPositionConfig)(LearnedPosition)
POSITION.register("rope", RotaryConfig)(RotaryPosition)
POSITION.register("blackhole_rope", BlackHoleRoPEConfig)(BlackHoleRoPE)
