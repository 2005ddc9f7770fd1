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

from moa.kernels.key_compaction import Part, block_parts
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
    """(q', k', v', gate, band) -> out' (B, Hq, T, E): fused attention over the augmented
    heads, own keys kept; the gate (B, Hkv, S) gets the multiplicative-weight gradient at
    its kept keys and at the pruned keys that `band` marks (None: at every key)."""

    @staticmethod
    def forward(ctx, q, k, v, gate, band, bias_column: int):
        T, S, group = q.size(2), k.size(2), q.size(1) // k.size(1)
        if gate is None:
            blocks = [[_dense_part(T, S, q.dtype, q.device)]]
            k_closed, kept, rescued = k, None, None
        else:
            kept = gate.detach() != 0  # (B, Hkv, S)
            k_closed = k.clone()
            k_closed[..., bias_column] = (~kept).to(k.dtype) * -(torch.finfo(k.dtype).max / 8)
            blocks = block_parts(kept, T, group, q.dtype)
        out, lse = _attend(q, k_closed, v, blocks)
        if gate is not None:  # add back the own keys that the gate pruned
            own = _OwnKey(q, k, v)
            rescued = ~kept[:, :, own.slice].repeat_interleave(own.group, dim=1)  # (B,Hq,T)
            merged = torch.where(rescued, torch.logaddexp(lse, own.score), lse)
            w_kept = torch.exp(lse - merged)[..., None]
            w_own = torch.where(rescued, torch.exp(own.score - merged), 0.0)[..., None]
            out = (w_kept * _wide(out) + w_own * own.v).to(q.dtype)
            lse = merged
        ctx.save_for_backward(q, k, k_closed, v, out, lse, kept, rescued, band)
        ctx.blocks, ctx.bias_column = blocks, bias_column
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, k_closed, v, out, lse, kept, rescued, band = ctx.saved_tensors
        dq, dk, dv = _attend_backward(d_out, q, k_closed, v, out, lse, ctx.blocks)
        if rescued is None:
            return dq, dk, dv, None, None, None
        d_kept = dk[..., ctx.bias_column]  # (B, Hkv, S): a kept key's gate gradient + own term
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
            open_keys = ~kept if band is None else band & ~kept  # (B, Hkv, S)
            d_open = torch.zeros_like(d_kept)
            if open_keys.any():  # the open pass: pruned keys let in, their gate's gradient
                blocks = block_parts(open_keys, q.size(2), own.group, q.dtype)
                d_open = _attend_backward(d_out.to(q.dtype), q, k, v, out, lse, blocks)[1]
                d_open = d_open[..., ctx.bias_column]
            own_term = own.to_keys(d_score[..., None], d_kept[..., None])[..., 0]
            d_gate = torch.where(kept, d_kept, d_open) - own_term
            d_gate = d_gate.masked_fill(~(kept | open_keys), 0.0)
        return dq, dk, dv, d_gate, None, None


def _dense_part(n_queries: int, n_keys: int, dtype: torch.dtype, device: torch.device) -> Part:
    """Every query over every key, causal: one call (no gate, nothing to compact)."""
    mask = causal_mask(n_queries, n_keys, device)
    if mask is not None:  # the kernel takes an additive mask of q's dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    return Part(slice(0, n_queries), slice(0, n_keys), mask, mask is None and n_queries > 1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[list[Part]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, T, E) and its row log-sum-exp (B, Hq, T): each block's calls merged."""
    if len(blocks) == 1 and len(blocks[0]) == 1:
        part = blocks[0][0]
        return FLASH(q[:, :, part.rows], part.select(k), part.select(v), 0.0, part.is_causal,
                     attn_mask=part.mask, scale=1.0)
    out = _wide(q.new_empty(q.shape))
    lse = out.new_empty(q.shape[:3])
    for parts in blocks:
        rows = parts[0].rows
        outs, lses = zip(*(FLASH(q[:, :, rows], part.select(k), part.select(v), 0.0,
                                 part.is_causal, attn_mask=part.mask, scale=1.0)
                           for part in parts), strict=True)
        merged = torch.logsumexp(torch.stack(lses), dim=0)  # (B, Hq, rows)
        lse[:, :, rows] = merged
        out[:, :, rows] = sum(torch.exp(part_lse - merged)[..., None] * _wide(part_out)
                              for part_out, part_lse in zip(outs, lses, strict=True))
    return out, lse


def _attend_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, blocks: list[list[Part]]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of `_attend`'s calls, given the final (merged) out and lse: each call's
    probabilities are then the final ones, so its gradients are its share of the total."""
    if len(blocks) == 1 and len(blocks[0]) == 1:
        part = blocks[0][0]
        return FLASH_BACKWARD(d_out, q, k, v, out, lse, 0.0, part.is_causal,
                              attn_mask=part.mask, scale=1.0)
    dq, dk, dv = _wide(torch.zeros_like(q)), _wide(torch.zeros_like(k)), _wide(torch.zeros_like(v))
    for parts in blocks:
        rows = parts[0].rows
        for part in parts:
            dq_part, dk_part, dv_part = FLASH_BACKWARD(
                d_out[:, :, rows], q[:, :, rows], part.select(k), part.select(v),
                out[:, :, rows], lse[:, :, rows], 0.0, part.is_causal, attn_mask=part.mask,
                scale=1.0)
            dq[:, :, rows] += dq_part
            part.scatter_add(dk, dk_part)
            part.scatter_add(dv, dv_part)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def metric_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor,
                         alpha: torch.Tensor, gate: torch.Tensor | None,
                         gate_band: torch.Tensor | None = None) -> torch.Tensor:
    """Metric attention through the fused CPU kernel; shapes as `metric_attention_eager`.
    With a gate, attention runs over the kept keys only (`key_compaction.py`)."""
    D = q.size(-1)
    q_aug, k_aug, v_aug = augment(q, k, v, k_norm, alpha)
    band = None if gate_band is None else gate_band.detach().bool()
    return _FusedMetricAttention.apply(q_aug, k_aug, v_aug, gate, band, D + 3)[..., :D]
