"""Metric attention, eagerly: the readable reference every faster implementation matches.

Every implementation (`metric_attention_eager` here, `metric_attention_cpu` in
`metric_cpu.py`, `metric_attention_triton` in `metric_triton.py`) has this signature:

    out = fn(q, k, v, k_norm, alpha, gate, gate_band=None)

    q       (B, Hq, T, D)   queries, already in the head's metric space (cosine-normalised,
                            scaled by sqrt of the Mahalanobis weights: see `MetricSpace`)
    k, v    (B, Hkv, S, D)  keys (metric space) and values; Hq % Hkv == 0 (GQA groups)
    k_norm  (B, Hkv, S)     ||k_j||^2, passed in so that a KV cache can keep it
    alpha   (Hq,)           positive sharpness per query head
    gate    (B, Hkv, S) | None   1 keeps key j, 0 prunes it (ball pruning); None keeps all
    gate_band (B, Hkv, S) bool | None   the keys whose gate gradient is wanted (the ball's
                            band, `BallGate.band`, where its surrogate has a slope); a fused
                            kernel may leave any other key's gate gradient at zero and skip
                            the pruned ones. None: every key. The reference computes every
                            key's gradient and ignores it.
    out     (B, Hq, T, D)

The score of query i for key j is `s_ij = -alpha * ||q_i - k_j||^2`. The queries are the
last T of the S positions (causal: query i sees keys j <= S - T + i; the reference also
takes `query_positions` (B, T), queries anywhere, as a forward that wants a few positions
has them), and a query always
keeps its own key whatever its gate says, so no row is empty. A pruned key enters the
softmax with weight `gate_j * exp(s_ij)`: the gate is a multiplicative weight, so the
gradient with respect to a pruned key's gate is defined (and used by the ball's
straight-through estimator, `moa/attention/balls.py`); the own key's weight is 1, so no
gate gradient flows through it. That gradient, at weight 0, is `sum_i p~_ij dO_i.(v_j -
out_i)` with `p~_ij = exp(s_ij - lse_i)` the probability key j would take if let in
alone, which is unbounded where a pruned key outscores the kept ones (e^50 for a key 50
above them): every implementation caps it at 1, `p~_ij = exp(min(s_ij - lse_i, 0))`, so a
pruned key counts at most as a key that takes the whole row. The cap changes no kept
key's weight, and so neither the output nor any other gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def metric_scores(q: torch.Tensor, k: torch.Tensor, k_norm: torch.Tensor,
                  alpha: torch.Tensor) -> torch.Tensor:
    """-alpha * ||q_i - k_j||^2 for every pair: (B, Hq, T, S). Keys are repeated over GQA
    groups; the squared distance expands as ||q||^2 + ||k||^2 - 2 q.k (as `torch.cdist`)."""
    group = q.size(1) // k.size(1)
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, S, D)
    k_norm = k_norm.repeat_interleave(group, dim=1)  # (B, Hq, S)
    q_norm = q.pow(2).sum(-1)  # (B, Hq, T)
    distance = q_norm[..., :, None] + k_norm[..., None, :] - 2 * q @ k.transpose(-1, -2)
    return -alpha.view(1, -1, 1, 1) * distance


def allowed_keys(q_len: int, k_len: int, device: torch.device,
                 query_positions: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, own): bool masks of the keys each query may see and of its own key, (T, S)
    for the last T of S positions, or (B, 1, T, S) for queries at query_positions (B, T)."""
    if query_positions is None:
        rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    else:
        rows = query_positions[:, None, :, None]
    cols = torch.arange(k_len, device=device)
    return cols <= rows, cols == rows


def metric_attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor,
                           alpha: torch.Tensor, gate: torch.Tensor | None,
                           gate_band: torch.Tensor | None = None,
                           dropout: float = 0.0,
                           query_positions: torch.Tensor | None = None,
                           causal: bool = True,
                           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: a (T x S) score matrix per head, in any dtype (float64 for tests).
    `dropout` drops attention probabilities (training with `attn_drop`; eager only);
    `query_positions` (B, T) places the queries at those positions (eager only).
    `causal=False`: every query sees every key (no key is a query's own, so no gate);
    key_mask (B, S) True where a key is real (padding, memory slots)."""
    group = q.size(1) // k.size(1)
    scores = metric_scores(q, k, k_norm, alpha)  # (B, Hq, T, S)
    allowed, own = allowed_keys(q.size(2), k.size(2), q.device, query_positions)
    if not causal:
        allowed, own = torch.ones_like(allowed), torch.zeros_like(own)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    weight = allowed.to(scores.dtype).expand_as(scores)  # multiplicative key weights
    if gate is not None:
        gate = gate.to(scores.dtype).repeat_interleave(group, dim=1)[:, :, None, :]  # (B,Hq,1,S)
        weight = torch.where(own, torch.ones_like(weight), weight * gate)
    top = scores.masked_fill(weight == 0, float("-inf")).amax(-1, keepdim=True).detach()
    relative = (scores - top).masked_fill(~allowed, float("-inf"))  # (B, Hq, T, S)
    if gate is not None:  # a pruned key's exp(s - lse) capped at 1 (the module docstring)
        log_kept = (weight * torch.exp(relative)).sum(-1, keepdim=True).log().detach()
        relative = torch.where(weight == 0, relative.clamp(max=log_kept), relative)
    unnormalised = weight * torch.exp(relative)
    probs = F.dropout(unnormalised / unnormalised.sum(-1, keepdim=True), dropout)
    return probs.to(v.dtype) @ v.repeat_interleave(group, dim=1)
