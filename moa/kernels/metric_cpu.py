"""Metric attention on CPU through PyTorch's fused flash-attention kernel (`cpu_fused`).

Same signature and numbers as `metric_attention_eager` (see `metric_reference.py`).
Since `-a ||q - k||^2 = 2a q.k - a ||k||^2 - a ||q||^2` and the last term is constant along
a softmax row, metric attention is dot-product attention (scale 1) over augmented heads

    q' = [2a q,  -a_hi,  -a_hi,  -a_lo,  1,      0...]      (B, Hq, T, E)
    k' = [k,     n_hi,   n_lo,   n_hi,   bias_j, 0...]      (B, Hkv, S, E)
    v' = [v,     1,      0...]                              (B, Hkv, S, E)

with n = ||k||^2. The hi/lo split writes a and n as the sum of two numbers of the input
dtype, so in bfloat16 the key-norm bias keeps about 16 bits instead of 8 (in float32 and
float64 the lo parts are zero). `bias_j` is 0: its column's gradient, the sum of key j's
score gradients, is the gradient of key j's gate. E rounds D + 4 up to a multiple of 8, and
v is padded to E too: the fused kernel needs equal head dims, and an extra column costs
nothing there.

The kernel is called through `aten::_scaled_dot_product_flash_attention_for_cpu` and its
backward, which also hand over the row log-sum-exp: O(L) memory, no L x L tensor. Without
a gate, that is one causal call. With a gate (ball pruning), the keys the gate prunes are
dropped before the kernel, not masked inside it: the ball's test reads the key alone, so
a pruned key is pruned for every query. The kept keys are gathered and attention runs as
several calls, over windows of the gathered keys and over each query's diagonal block
(which keeps each query's own key), merged by log-sum-exp (`key_compaction.py`). Each
call's backward is given the merged output and log-sum-exp, so its probabilities are the
final ones and its gradients are its share of the total.

The gate's gradient (its multiplicative weight, as in the reference; a query's own key
excluded) is needed only where the ball's surrogate has a slope (`BallGate.band`). It is
the bias column's gradient: from the window calls above for the kept keys (no window holds
a query's own key), and from one more backward pass for the rest: the band's pruned keys
gathered into windows of their own, and the diagonal blocks with every key let in but each
query's own. Far keys outside the diagonal blocks are never read, and no far key gets a
gate gradient (`gate_band=None`: every pruned key gets one).
"""

from __future__ import annotations

import torch

from moa.kernels import key_compaction
from moa.kernels.key_compaction import (
    Compaction,
    Part,
    diagonal_parts,
    diagonal_windows,
    masked_part,
    window_parts,
)
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


class _FusedMetricAttention(torch.autograd.Function):
    """(q', k', v', gate, band) -> out' (B, Hq, T, E): fused attention over the augmented
    heads, own keys kept; the gate (B, Hkv, S) gets the multiplicative-weight gradient at
    the keys `band` marks (None: at every key), zero elsewhere."""

    @staticmethod
    def forward(ctx, q, k, v, gate, band, bias_column: int):
        T, S, group = q.size(2), k.size(2), q.size(1) // k.size(1)
        ctx.bias_column = bias_column
        kept = None if gate is None else gate.detach() != 0  # (B, Hkv, S)
        ctx.compaction = None
        if gate is None:
            ctx.parts = [_dense_part(T, S, q.dtype, q.device)]
        elif S <= key_compaction.SHORT:
            ctx.parts = [masked_part(kept, T, group, q.dtype, own_key=True)]
        else:
            ctx.compaction = Compaction(kept)
            ctx.parts = (diagonal_parts(kept, S, T, group, q.dtype)
                         + window_parts(ctx.compaction, S, T, group, q.dtype))
        out, lse = _attend(q, k, v, ctx.compaction, ctx.parts)
        ctx.save_for_backward(q, k, v, out, lse, kept, band)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, kept, band = ctx.saved_tensors
        args = (d_out, q, k, v, out, lse, ctx.bias_column)
        dq, dk, dv, d_gate = _attend_backward(*args, ctx.compaction, ctx.parts)
        if not ctx.needs_input_grad[3]:
            return dq, dk, dv, None, None, None
        # The open pass, for the rest of the gate's gradient at the band's keys: the pruned
        # ones let in over the windows, and every one over its diagonal block.
        T, S, group = q.size(2), k.size(2), q.size(1) // k.size(1)
        band = torch.ones_like(kept) if band is None else band  # (B, Hkv, S)
        if ctx.compaction is None:  # short: one call, the band's keys let in
            part = masked_part(band, T, group, q.dtype, own_key=False)
            d_gate = FLASH_BACKWARD(d_out, q, k, v, out, lse, 0.0, False, attn_mask=part.mask,
                                    scale=1.0)[1][..., ctx.bias_column]
            return dq, dk, dv, d_gate.masked_fill(~band, 0.0), None, None
        opened = Compaction(band & ~kept)
        d_gate = d_gate + _attend_backward(*args, opened,
                                           window_parts(opened, S, T, group, q.dtype),
                                           gate_only=True)[3]
        banded = Compaction(band)
        d_gate = d_gate + _attend_backward(*args, banded,
                                           diagonal_windows(banded, S, T, group, q.dtype),
                                           gate_only=True)[3]
        return dq, dk, dv, d_gate.masked_fill(~band, 0.0), None, None


def _dense_part(n_queries: int, n_keys: int, dtype: torch.dtype, device: torch.device) -> Part:
    """Every query over every key, causal: one call (no gate, nothing to compact)."""
    mask = causal_mask(n_queries, n_keys, device)
    if mask is not None:  # the kernel takes an additive mask of q's dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    return Part(slice(0, n_queries), slice(0, n_keys), False, mask,
                mask is None and n_queries > 1)


def _sources(k: torch.Tensor, v: torch.Tensor, compaction: Compaction | None
             ) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values a part reads: gathered (True) or at their positions (False)."""
    if compaction is None:
        return {False: (k, v)}
    return {False: (k, v), True: (compaction.gather(k), compaction.gather(v))}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compaction: Compaction | None,
            parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, T, E) and its row log-sum-exp (B, Hq, T): the calls merged."""
    sources = _sources(k, v, compaction)

    def call(part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = (x[:, :, part.keys] for x in sources[part.gathered])
        return FLASH(q[:, :, part.rows], keys, values, 0.0, part.is_causal,
                     attn_mask=part.mask, scale=1.0)

    if len(parts) == 1:
        return call(parts[0])
    out = _wide(q.new_empty(q.shape))
    lse = q.new_empty(q.shape[:3], dtype=out.dtype)
    for part in parts:  # the diagonal blocks first: they cover every row
        rows = part.rows
        part_out, part_lse = call(part)
        if not part.gathered:
            out[:, :, rows], lse[:, :, rows] = part_out, part_lse
            continue
        merged = torch.logaddexp(lse[:, :, rows], part_lse)
        out[:, :, rows].lerp_(_wide(part_out), torch.exp(part_lse - merged)[..., None])
        lse[:, :, rows] = merged
    return out.to(q.dtype), lse


def _attend_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, bias_column: int,
                     compaction: Compaction | None, parts: list[Part], gate_only: bool = False
                     ) -> tuple[torch.Tensor | None, ...]:
    """dq, dk, dv of `_attend`'s calls given the final (merged) out and lse: each call's
    probabilities are then the final ones, so its gradients are its share of the total.
    Also the gate gradient (B, Hkv, S): the bias column's gradient of the window calls (no
    window holds a query's own key, whose weight is 1). `gate_only`: that alone."""
    if compaction is None:  # one dense call
        part = parts[0]
        dq, dk, dv = FLASH_BACKWARD(d_out, q, k, v, out, lse, 0.0, part.is_causal,
                                    attn_mask=part.mask, scale=1.0)
        return dq, dk, dv, None
    sources = _sources(k, v, compaction)
    d_gate = _wide(sources[True][0].new_zeros(sources[True][0].shape[:3]))  # (B, Hkv, width)
    if not gate_only:
        dq = torch.zeros_like(_wide(q))
        dk = {gathered: torch.zeros_like(_wide(keys)) for gathered, (keys, _) in sources.items()}
        dv = {gathered: torch.zeros_like(_wide(values))
              for gathered, (_, values) in sources.items()}
    for part in parts:
        keys, values = (x[:, :, part.keys] for x in sources[part.gathered])
        rows = part.rows
        dq_part, dk_part, dv_part = FLASH_BACKWARD(
            d_out[:, :, rows], q[:, :, rows], keys, values, out[:, :, rows],
            lse[:, :, rows], 0.0, part.is_causal, attn_mask=part.mask, scale=1.0)
        if part.gathered:
            d_gate[:, :, part.keys] += dk_part[..., bias_column]
        if not gate_only:
            dq[:, :, rows] += dq_part
            dk[part.gathered][:, :, part.keys] += dk_part
            dv[part.gathered][:, :, part.keys] += dv_part
    d_gate = compaction.scatter_add_(torch.zeros_like(_wide(k[..., 0])), d_gate)
    if gate_only:
        return None, None, None, d_gate
    dk, dv = (compaction.scatter_add_(x[False], x[True]) for x in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_gate


def metric_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor,
                         alpha: torch.Tensor, gate: torch.Tensor | None,
                         gate_band: torch.Tensor | None = None) -> torch.Tensor:
    """Metric attention through the fused CPU kernel; shapes as `metric_attention_eager`.
    With a gate, attention runs over the kept keys only (`key_compaction.py`)."""
    D = q.size(-1)
    q_aug, k_aug, v_aug = augment(q, k, v, k_norm, alpha)
    band = None if gate_band is None else gate_band.detach().bool()
    return _FusedMetricAttention.apply(q_aug, k_aug, v_aug, gate, band, D + 3)[..., :D]
