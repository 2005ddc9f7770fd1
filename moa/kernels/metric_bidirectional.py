"""Metric attention without a causal mask, on any device: a bidirectional encoder's
self-attention and cross-attention into a memory (keys that are no query's own).

Same numbers as `metric_attention_eager(..., causal=False, key_mask=...)`. As in
`metric_cpu.py`, `-a ||q - k||^2` is dot-product attention over augmented heads
(`augment`); with no causal mask and no ball gate there is no own key to rescue, so
PyTorch's `scaled_dot_product_attention` runs them directly on whatever kernel the device
has (flash or memory-efficient: O(L) memory; one query per head grouped by key head,
`dot_product.py`), its boolean mask dropping padded keys.
Forward and backward are PyTorch's; the ball gate is not supported (no own key: a query
whose keys were all pruned would have none), which the configs refuse.
"""

from __future__ import annotations

import torch

from moa.kernels.dot_product import dot_product_attention
from moa.kernels.metric_cpu import augment


def metric_attention_bidirectional(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   k_norm: torch.Tensor, alpha: torch.Tensor,
                                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, T, D), k, v (B, Hkv, S, D), k_norm (B, Hkv, S), alpha (Hq,), key_mask
    (B, S) True where a key is real -> (B, Hq, T, D). Every row needs one real key."""
    D = q.size(-1)
    q_aug, k_aug, v_aug = augment(q, k, v, k_norm, alpha)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = dot_product_attention(q_aug, k_aug, v_aug, attn_mask=mask, scale=1.0)
    return out[..., :D]
