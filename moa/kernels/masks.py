"""Causal masks as boolean tensors: True where a query may attend to a key."""

from __future__ import annotations

import torch


def causal_mask_at(query_positions: torch.Tensor, k_len: int) -> torch.Tensor:
    """Boolean (B, 1, K, k_len) mask for queries at the absolute query_positions (B, K)
    over the keys at positions 0..k_len-1: True where the key is at or before the query."""
    keys = torch.arange(k_len, device=query_positions.device)
    return keys <= query_positions[:, None, :, None]


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (q_len, k_len) mask, True where attention is allowed; None when the queries
    are exactly the keys (then `is_causal` is cheaper) or a single query sees every key."""
    if q_len == k_len or q_len == 1:
        return None
    return _lower_triangle(q_len, k_len, device)


def _lower_triangle(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    offset = k_len - q_len  # queries are the last q_len of the k_len positions
    rows = torch.arange(q_len, device=device)[:, None] + offset
    return rows >= torch.arange(k_len, device=device)[None, :]


def attention_mask(q_len: int, k_len: int, device: torch.device, causal: bool = True,
                   key_mask: torch.Tensor | None = None,
                   query_positions: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for `scaled_dot_product_attention`: a boolean mask broadcasting to
    (B, H, q_len, k_len), True where a query may attend, or None with `is_causal` saying
    whether the kernel's own causal mask applies. Causal queries are the last q_len of the
    k_len positions, or at query_positions (B, q_len); key_mask (B, k_len) is True where a
    key is real (padding, empty memory slots)."""
    if not causal:
        mask = None
    elif query_positions is not None:
        mask = causal_mask_at(query_positions, k_len)  # (B, 1, K, S)
    elif key_mask is not None and q_len > 1:  # the kernel's is_causal cannot take a key mask
        mask = _lower_triangle(q_len, k_len, device)
    else:
        mask = causal_mask(q_len, k_len, device)
    if key_mask is not None:
        keys = key_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = keys if mask is None else mask & keys
    return mask, causal and mask is None and q_len > 1
