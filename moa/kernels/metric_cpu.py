"""Metric attention on CPU through PyTorch's fused flash-attention kernel (`cpu_fused`).

Same signature and numbers as `metric_attention_eager` (see `metric_reference.py`).
Since `-a ||q - k||^2 = 2a q.k - a ||k||^2 - a ||q||^2` and the last term is constant along
a softmax row, metric attention is dot-product attention (scale 1) over augmented heads

    q' = [2a q,  -a_hi,  -a_hi,  -a_lo,  1,      0...]      (B, Hq, T, E)
    k' = [k,     n_hi,   n_lo,   n_hi,   bias_j, 0...]      (B, Hkv, S, E)
    v' = [v,     1,      0...]                              (B, Hkv, S, E)

with n = ||k||^2. The hi/lo split writes a and n as the sum of two numbers of the input
dtype, so in bfloat16 the key-norm bias keeps about 16 bits instead of 8 (in float32 and
float64 the lo parts are zero). `bias_j` is 0 for a kept key and a huge negative number for
a key pruned by its ball. E rounds D + 4 up to a multiple of 8, and v is padded to E too:
the fused kernel needs equal head dims, and an extra column costs nothing there.

The kernel is called through `aten::_scaled_dot_product_flash_attention_for_cpu` and its
backward, which also hand over the row log-sum-exp: O(L) memory, no L x L tensor.
A query keeps its own key even where its ball prunes it: those rows are merged with the
own key's term by log-sum-exp arithmetic after the kernel. The backward kernel is then
given the merged output and log-sum-exp, so its probabilities are the final ones; the own
key's term is added in closed form. The gradient for a key's gate (its multiplicative
weight, as in the reference) is the bias column's gradient from a second backward pass in
which no key is pruned, less the own-key term.
"""

from __future__ import annotations

import torch

from moa.kernels.masks import causal_mask

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo with hi, lo in `dtype` (lo is zero when `dtype` holds x exactly)."""
    hi = x.to(dtype)
    return hi, (x - hi.to(x.dtype)).to(dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def augment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor,
            alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q', k' (bias column zero), v' as in the module docstring."""
    D, dtype = q.size(-1), q.dtype
    width = -(-(D + 4) // 8) * 8
    alpha = _wide(alpha).view(1, -1, 1, 1)
    a_hi, a_lo = _split(alpha.expand(*q.shape[:3], 1), dtype)  # (B, Hq, T, 1)
    n_hi, n_lo = _split(_wide(k_norm)[..., None], dtype)  # (B, Hkv, S, 1)
    q_aug = torch.cat([(2 * alpha * q).to(dtype), -a_hi, -a_hi, -a_lo, torch.ones_like(a_hi),
                       q.new_zeros(*q.shape[:3], width - D - 4)], dim=-1)
    k_aug = torch.cat([k, n_hi, n_lo, n_hi, k.new_zeros(*k.shape[:3], width - D - 3)], dim=-1)
    v_aug = torch.cat([v, v.new_zeros(*v.shape[:3], width - D)], dim=-1)
    return q_aug, k_aug, v_aug


class _OwnKey:
    """Each query's own key (the last T of S), repeated over the GQA group: (B, Hq, T, E)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.group, self.T, S = q.size(1) // k.size(1), q.size(2), k.size(2)
        self.slice = slice(S - self.T, S)
        self.k = _wide(k[:, :, self.slice].repeat_interleave(self.group, dim=1))
        self.v = _wide(v[:, :, self.slice].repeat_interleave(self.group, dim=1))
        self.score = (_wide(q) * self.k).sum(-1)  # (B, Hq, T)

    def to_keys(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sum (B, Hq, T, ...) over each GQA group into the own keys' rows of `like`."""
        B, Hq = x.shape[:2]
        summed = x.view(B, Hq // self.group, self.group, *x.shape[2:]).sum(2)
        result = torch.zeros_like(like)
        result[:, :, self.slice] = summed.to(like.dtype)
        return result


class _FusedMetricAttention(torch.autograd.Function):
    """(q', k', v', gate) -> out' (B, Hq, T, E): fused attention over the augmented heads,
    own keys kept; the gate (B, Hkv, S) gets the multiplicative-weight gradient."""

    @staticmethod
    def forward(ctx, q, k, v, gate, bias_column: int):
        T, S = q.size(2), k.size(2)
        mask = causal_mask(T, S, q.device)
        if mask is not None:  # the kernel takes an additive mask of q's dtype
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        is_causal = mask is None and T > 1
        k_pruned = k
        if gate is not None:
            k_pruned = k.clone()
            k_pruned[..., bias_column] = (gate == 0).to(k.dtype) * -(torch.finfo(k.dtype).max / 8)
        out, lse = FLASH(q, k_pruned, v, 0.0, is_causal, attn_mask=mask, scale=1.0)
        rescued = None
        if gate is not None:  # add back the own keys that the gate pruned
            own = _OwnKey(q, k, v)
            rescued = gate[:, :, own.slice].repeat_interleave(own.group, dim=1) == 0  # (B,Hq,T)
            merged = torch.where(rescued, torch.logaddexp(lse, own.score), lse)
            w_kept = torch.exp(lse - merged)[..., None]
            w_own = torch.where(rescued, torch.exp(own.score - merged), 0.0)[..., None]
            # In place: the backward kernel expects the layouts its forward returned.
            out.copy_(w_kept * _wide(out) + w_own * own.v)
            lse.copy_(merged)
        ctx.save_for_backward(q, k, k_pruned, v, out, lse, rescued)
        ctx.mask, ctx.is_causal, ctx.bias_column = mask, is_causal, bias_column
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, k_pruned, v, out, lse, rescued = ctx.saved_tensors
        flash = dict(dropout_p=0.0, is_causal=ctx.is_causal, attn_mask=ctx.mask, scale=1.0)
        dq, dk, dv = FLASH_BACKWARD(d_out, q, k_pruned, v, out, lse, **flash)
        if rescued is None:
            return dq, dk, dv, None, None
        own = _OwnKey(q, k, v)
        p_own = torch.exp(own.score - lse)  # (B, Hq, T): own key's final probability
        d_out, row = _wide(d_out), (_wide(d_out) * _wide(out)).sum(-1)
        d_score = p_own * ((d_out * own.v).sum(-1) - row)  # (B, Hq, T)
        d_rescued = torch.where(rescued, d_score, 0.0)[..., None]
        dq = dq + (d_rescued * own.k).to(dq.dtype)
        dk = dk + own.to_keys(d_rescued * _wide(q), dk)
        dv = dv + own.to_keys(torch.where(rescued[..., None], p_own[..., None] * d_out, 0.0), dv)
        d_gate = None
        if ctx.needs_input_grad[3]:
            _, dk_open, _ = FLASH_BACKWARD(d_out.to(q.dtype), q, k, v, out, lse, **flash)
            own_term = own.to_keys(d_score[..., None], dk_open[..., :1])[..., 0]
            d_gate = dk_open[..., ctx.bias_column] - own_term
        return dq, dk, dv, d_gate, None


def metric_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor,
                         alpha: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Metric attention through the fused CPU kernel; shapes as `metric_attention_eager`."""
    D = q.size(-1)
    q_aug, k_aug, v_aug = augment(q, k, v, k_norm, alpha)
    return _FusedMetricAttention.apply(q_aug, k_aug, v_aug, gate, D + 3)[..., :D]
