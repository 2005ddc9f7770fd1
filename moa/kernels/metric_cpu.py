"""Metric attention on CPU (`cpu_fused`): PyTorch's fused flash kernel, or with a ball gate
our kernel over the kept keys (`pruned_attention.py`).

Same signature and numbers as `metric_attention_eager` (see `metric_reference.py`).
Since `-a ||q - k||^2 = 2a q.k - a ||k||^2 - a ||q||^2` and the last term is constant along
a softmax row, metric attention is dot-product attention (scale 1) of 2a q with a bias
-a n per key, n = ||k||^2.

Without a gate that is one call of `scaled_dot_product_attention`, which runs PyTorch's
CPU flash kernel: O(L) memory, no L x L tensor. It takes no bias, so the bias rides in
augmented heads

    q' = [2a q,  -a_hi,  -a_hi,  -a_lo,  0...]      (B, Hq, T, E)
    k' = [k,     n_hi,   n_lo,   n_hi,   0...]      (B, Hkv, S, E)
    v' = [v,     0...]                              (B, Hkv, S, E)

The hi/lo split writes a and n as the sum of two numbers of the input dtype, so in
bfloat16 the key-norm bias keeps about 16 bits instead of 8 (in float32 and float64 the lo
parts are zero). E rounds D + 3 up to a multiple of 8, and v is padded to E too: the fused
kernel needs equal head dims, and an extra column costs nothing there.

With a gate (ball pruning) the pruned keys are dropped before attention, not masked inside
it (`pruned_attention.py`). That kernel reads the bias beside the heads, in float32 at
least, so nothing is augmented: no copy of the heads is made but the kept keys' gather.
Where it cannot be built, the eager reference runs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moa.kernels.dot_product import dot_product_attention
from moa.kernels.masks import attention_mask
from moa.kernels.metric_reference import metric_attention_eager
from moa.kernels.pruned_attention import built, pruned_attention


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo with hi, lo in `dtype` (lo is zero when `dtype` holds x exactly)."""
    hi = x.to(dtype)
    return hi, (x - hi.to(x.dtype)).to(dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def augment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor,
            alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q', k', v' as in the module docstring."""
    D, dtype = q.size(-1), q.dtype
    width = -(-(D + 3) // 8) * 8
    alpha = _wide(alpha).view(1, -1, 1, 1)
    a_hi, a_lo = _split(alpha.expand(*q.shape[:3], 1), dtype)  # (B, Hq, T, 1)
    n_hi, n_lo = _split(_wide(k_norm)[..., None], dtype)  # (B, Hkv, S, 1)
    q_aug = torch.cat([(2 * alpha * q).to(dtype), -a_hi, -a_hi, -a_lo,
                       q.new_zeros(*q.shape[:3], width - D - 3)], dim=-1)
    k_aug = torch.cat([k, n_hi, n_lo, n_hi, k.new_zeros(*k.shape[:3], width - D - 3)], dim=-1)
    v_aug = torch.cat([v, v.new_zeros(*v.shape[:3], width - D)], dim=-1)
    return q_aug, k_aug, v_aug


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal dot-product attention at scale 1 of q (B, Hq, T, E), which carries its scales,
    over k, v (B, Hkv, S, E), the queries the last T of the S positions."""
    mask, is_causal = attention_mask(q.size(2), k.size(2), q.device)
    return dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0)


def metric_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor,
                         alpha: torch.Tensor, gate: torch.Tensor | None,
                         gate_band: torch.Tensor | None = None) -> torch.Tensor:
    """Metric attention through the fused CPU kernels; shapes as `metric_attention_eager`.
    With a gate, attention reads the kept keys only, and the gate's gradient is computed
    at the keys gate_band marks (None: every key) and is zero elsewhere; one query that
    needs no gradient (a decoding step) is one masked call instead (`_one_query`)."""
    if gate is None:
        q_aug, k_aug, v_aug = augment(q, k, v, k_norm, alpha)
        return scaled_dot_product(q_aug, k_aug, v_aug)[..., :q.size(-1)]
    alpha = _wide(alpha)
    q_scaled = 2 * alpha.view(1, -1, 1, 1) * q  # (B, Hq, T, D), at least float32
    if q.size(2) == 1 and not _needs_grad(q, k, v, k_norm, alpha, gate):
        return _one_query(q_scaled, k, v, k_norm, -alpha, gate).to(q.dtype)
    if not built():
        return metric_attention_eager(q, k, v, k_norm, alpha, gate)
    return pruned_attention(q_scaled, k, v, k_norm, -alpha, gate, gate_band).to(q.dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """A decoding step's attention over a ball-aware cache, without gradients: the query
    q (B, Hq, 1, D) (the last of the S positions) over the keys gate (B, Hkv, S) keeps and
    its own, with scores q.k + scale_h bias_j, in one masked call of PyTorch's attention,
    in float32 at least. The cache holds kept keys only, so the gathering that makes the
    pruned kernel pay over long sequences would copy every held key again. A key head's
    group of query heads attends as that head's `group` queries, under one mask, so that
    no key, value or mask is repeated per query head."""
    B, Hkv, S = gate.shape
    dtype, group = q.dtype, q.size(1) // Hkv  # q: float32 at least
    keep = gate != 0
    keep[..., -1] = True  # the query's own key
    scores = scale.view(1, Hkv, group, 1) * bias.to(dtype)[:, :, None]  # (B, Hkv, group, S)
    mask = torch.where(keep[:, :, None], scores, float("-inf"))
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, group, -1), k.to(dtype),
                                         v.to(dtype), attn_mask=mask, scale=1.0)
    return out.view(q.shape)  # (B, Hq, 1, D)
