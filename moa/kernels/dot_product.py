"""PyTorch's scaled dot-product attention, with one query per head read as its key head's.

Under GQA and MQA a group of query heads shares each key head. With `enable_gqa` PyTorch's
CPU kernel reads a key head's keys and values once for every query head of its group.
At one query per head (a decoding step) that read is the whole cost, and it grows with
the cache. Here the group's queries are instead passed as rows of their key head,
(B, Hq, 1, D) -> (B, Hkv, group, D), so the cache is read once per key head: the same
numbers, one call, and from context 256 on 0.35-0.75x the time for GQA and MQA on CPU
(docs/benchmarks.md; CUDA takes the same call, not measured there). Any other call goes
to PyTorch as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                          scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention` of q (B, Hq, T, D) over k (B, Hkv, S, D) and v
    (B, Hkv, S, Dv), GQA where Hkv < Hq -> (B, Hq, T, Dv). attn_mask broadcasts to
    (B, Hq, T, S). A single query (T = 1, not causal) under a mask with one head, or none,
    attends as a row of its key head's group."""
    B, Hq, T, D = q.shape
    Hkv = k.size(1)
    one_mask = attn_mask is None or (attn_mask.dim() == 4 and attn_mask.size(1) == 1)
    if T == 1 and Hq != Hkv and not is_causal and one_mask:
        rows = q.reshape(B, Hkv, Hq // Hkv, D)  # (B, Hkv, group, D): heads h*group.. of h
        out = F.scaled_dot_product_attention(rows, k, v, attn_mask=attn_mask,
                                             dropout_p=dropout_p, scale=scale)
        return out.view(B, Hq, 1, v.size(-1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale,
                                          enable_gqa=Hq != Hkv)
