"""Metric attention through PyTorch's FlexAttention: the library way, held against the
hand-written Triton kernel on GPU (`bench/attention.py --device cuda --impls sdpa triton
flex`). Same signature and numbers as `metric_attention_eager` (`metric_reference.py`).

Since `-a ||q - k||^2 = 2a q.k - a ||k||^2 - a ||q||^2` and the last term is constant along
a softmax row, metric attention is `flex_attention` over (2a q, k, v) with scale 1 and a
`score_mod` that subtracts `a_h ||k_j||^2`. Causality is the `BlockMask`'s (queries are the
last T of the S positions), and so is ball pruning: a query sees the keys the gate keeps
and its own key, and the kernel skips key blocks with none of them.

The gate's gradient (its multiplicative weight, as in the reference, at the keys of
`gate_band`; None: every key) cannot come from a mask that drops pruned keys. It is one
more FlexAttention forward with the roles turned (`_GateGradient`): each key asks the
queries that see it (its own query left out), scored `s_ij - lse_i` with the forward's row
log-sum-exp, over the values `[dO_i, -Delta_i]` (Delta_i = dO_i . out_i); with `v_j`
augmented by a 1 and times `exp(lse_j)`, that is `sum_i exp(s_ij - lse_i) (dO_i . v_j -
Delta_i)`, the reference's gradient for kept and pruned keys alike.

Limits: on CPU, `flex_attention` runs only uncompiled and without a backward pass (torch
2.13: "FlexAttention does not support backward on CPU"), so the tests there check the
forward and the gate's gradient (q, k and v taking none); on GPU it is compiled.
"""

from __future__ import annotations

from functools import cache

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

BLOCK = 128  # the BlockMask's block (FlexAttention's default): the kernel's tile on GPU


def metric_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_norm: torch.Tensor, alpha: torch.Tensor,
                          gate: torch.Tensor | None = None,
                          gate_band: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, T, D), k, v (B, Hkv, S, D), k_norm (B, Hkv, S), alpha (Hq,), gate (B, Hkv, S)
    0/1 or None -> (B, Hq, T, D); the gate gets its gradient at the keys gate_band marks."""
    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group, offset = Hq // Hkv, S - T
    wide = torch.promote_types(q.dtype, torch.float32)  # the bias in at least float32
    key_bias, alpha_wide = k_norm.to(wide), alpha.to(wide)  # (B, Hkv, S), (Hq,)
    kept = None if gate is None else gate.detach() != 0

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - alpha_wide[h] * key_bias[b, h // group, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        position = q_idx + offset
        visible = kv_idx <= position
        if kept is None:
            return visible
        return visible & (kept[b, h // group, kv_idx] | (kv_idx == position))

    blocks = create_block_mask(mask_mod, B, Hq, T, S, device=q.device, BLOCK_SIZE=BLOCK)
    queries = q * (2 * alpha).to(q.dtype).view(1, -1, 1, 1)  # (B, Hq, T, D)
    out, lse = _flex(q.device)(queries, k, v, score_mod=score_mod, block_mask=blocks,
                               scale=1.0, enable_gqa=group > 1, return_lse=True)
    if gate is None or not gate.requires_grad:
        return out
    band = torch.ones_like(kept) if gate_band is None else gate_band.detach().bool()
    return _GateGradient.apply(out, gate, queries.detach(), k.detach(), v.detach(),
                               key_bias.detach(), alpha_wide.detach(), lse.detach(), band)


class _GateGradient(torch.autograd.Function):
    """out -> out; backward: the gate's gradient at the band's keys (module docstring)."""

    @staticmethod
    def forward(ctx, out, gate, queries, k, v, key_bias, alpha, lse, band):
        ctx.save_for_backward(out.detach(), queries, k, v, key_bias, alpha, lse, band)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, d_out):
        out, queries, k, v, key_bias, alpha, lse, band = ctx.saved_tensors
        d_gate = _gate_gradient(d_out, out, queries, k, v, key_bias, alpha, lse, band)
        return d_out, d_gate, None, None, None, None, None, None, None


def _gate_gradient(d_out, out, queries, k, v, key_bias, alpha, lse, band) -> torch.Tensor:
    """(B, Hkv, S): sum_i exp(min(s_ij - lse_i, 0)) (dO_i . v_j - dO_i . out_i) over the queries i
    that see key j, its own query left out, at the band's keys j; zero elsewhere."""
    B, Hq, T, D = queries.shape
    Hkv, S = k.shape[1], k.shape[2]
    group, offset, wide = Hq // Hkv, S - T, key_bias.dtype
    d_out, out = d_out.to(wide), out.to(wide)
    delta = (d_out * out).sum(-1, keepdim=True)  # (B, Hq, T, 1)
    width = 1 << D.bit_length()  # D + 1 value columns, padded to a power of two
    values = torch.cat([d_out, -delta, d_out.new_zeros(B, Hq, T, width - D - 1)], dim=-1)
    answering = queries.to(wide).reshape(B, Hkv, group * T, D)  # (g, i) as keys of head Hkv
    values = values.reshape(B, Hkv, group * T, width)

    def score_mod(score, b, h, key, row):  # s_ij - lse_i, capped at 0 as in the reference
        query_head = h * group + row // T
        return (score - alpha[query_head] * key_bias[b, h, key]
                - lse[b, query_head, row % T]).clamp(max=0.0)

    def mask_mod(b, h, key, row):
        return (key < row % T + offset) & band[b, h, key]

    blocks = create_block_mask(mask_mod, B, Hkv, S, group * T, device=k.device,
                               BLOCK_SIZE=BLOCK)
    asked, asked_lse = _flex(k.device)(k.to(wide), answering, values, score_mod=score_mod,
                                       block_mask=blocks, scale=1.0, return_lse=True)
    augmented = torch.cat([v.to(wide), v.new_ones(*v.shape[:3], 1, dtype=wide)], dim=-1)
    return (asked[..., :D + 1] * augmented).sum(-1) * asked_lse.exp()  # (B, Hkv, S)


def _flex(device: torch.device):
    """flex_attention compiled on GPU; on CPU its uncompiled reference (the only CPU path)."""
    return flex_attention if device.type == "cpu" else _compiled()


@cache
def _compiled():
    """flex_attention compiled (its fused kernel; uncompiled it is a slow reference)."""
    return torch.compile(flex_attention, dynamic=False)
