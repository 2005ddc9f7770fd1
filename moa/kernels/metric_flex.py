"""Metric attention through PyTorch's FlexAttention: the library way, held against the
hand-written Triton kernel on GPU (`bench/attention.py --device cuda --impls sdpa triton
flex`). Same signature and numbers as `metric_attention_eager` (`metric_reference.py`).

Since `-a ||q - k||^2 = 2a q.k - a ||k||^2 - a ||q||^2` and the last term is constant along
a softmax row, metric attention is `flex_attention` over (2a q, k, v) with scale 1 and a
`score_mod` that subtracts `a_h ||k_j||^2`. Causality is the `BlockMask`'s (queries are the
last T of the S positions), and so is ball pruning: a query sees the keys the gate keeps
and its own key, and the kernel skips key blocks with none of them.

Limits: on CPU, `flex_attention` runs only uncompiled and without a backward pass (torch
2.13: "FlexAttention does not support backward on CPU"), so the tests there check the
forward; on GPU it is compiled. A gate that needs a gradient (a learned radius) is refused:
the reference gives the band's pruned keys a gradient (the effect of letting each back in),
which a mask that drops them cannot give. Fixed balls (`learn_radius: false`, or
inference) are supported.
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
    0/1 or None -> (B, Hq, T, D). `gate_band` is taken for the kernels' one signature and
    not read (no gate gradient here)."""
    if gate is not None and gate.requires_grad:
        raise ValueError("metric_attention_flex: the gate needs a gradient (a learned ball "
                         "radius), which a BlockMask cannot give the band's pruned keys; use "
                         "the triton, cpu_fused or eager kernel")
    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group, offset = Hq // Hkv, S - T
    wide = torch.promote_types(q.dtype, torch.float32)  # the bias in at least float32
    key_bias, alpha_wide = k_norm.to(wide), alpha.to(wide)  # (B, Hkv, S), (Hq,)
    kept = None if gate is None else gate != 0

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - alpha_wide[h] * key_bias[b, h // group, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        position = q_idx + offset
        visible = kv_idx <= position
        if kept is None:
            return visible
        return visible & (kept[b, h // group, kv_idx] | (kv_idx == position))

    blocks = create_block_mask(mask_mod, B, Hq, T, S, device=q.device, BLOCK_SIZE=BLOCK)
    attend = flex_attention if q.device.type == "cpu" else _compiled()
    queries = (q * (2 * alpha).to(q.dtype).view(1, -1, 1, 1))  # (B, Hq, T, D)
    return attend(queries, k, v, score_mod=score_mod, block_mask=blocks, scale=1.0,
                  enable_gqa=group > 1)


@cache
def _compiled():
    """flex_attention compiled (its fused kernel; uncompiled it is a slow reference)."""
    return torch.compile(flex_attention, dynamic=False)
