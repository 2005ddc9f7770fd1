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
    offset = k_len - q_len  # queries are the last q_len of the k_len positions
    rows = torch.arange(q_len, device=device)[:, None] + offset
    return rows >= torch.arange(k_len, device=device)[None, :]
