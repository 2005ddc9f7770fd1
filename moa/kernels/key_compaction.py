"""Causal attention over a subset of the keys: which flash-kernel calls, over which keys.

A ball prunes a key for every query (its test reads the key alone), so pruned keys can be
dropped before attention instead of masked inside it. Per (batch, key head) the kept keys
are gathered in position order (`Compaction`), padded to the largest count over (batch,
head). Causal order then holds by blocks: every kept key before a query block's first
position is visible to every query of the block, so it is one unmasked call over a window
of the gathered keys (`window_parts`). A per-key additive mask hides the window's keys
that belong to another (batch, head): padding, or keys at or past the block.

Block levels (WINDOW_BLOCKS, e.g. 1024, 256, 64): a block of each level reads the kept
keys between the start of its parent block (position 0 for the top level) and its own
start, so most score pairs fall in calls of many queries (the flash kernel's backward is
slow for short query blocks) and each query is in one call per level. What is left is each
query's diagonal block, the last level's block at its own positions: a causal call over the
original keys whose mask keeps the kept keys and each query's own key (`diagonal_parts`).
Work: about `p L^2 / 2 + L n` score pairs (n the last level) against `L^2 / 2` unpruned,
plus a log-sum-exp merge per level. (The diagonal blocks as one batched eager product were
slower: on CPU the flash kernel's score pairs cost less than eager elementwise passes.)
Up to SHORT keys, where the calls and passes cost more than they save, attention is one
call over every key with a (T, S) mask (`masked_part`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WINDOW_BLOCKS = (1024, 256, 64)  # each divides the one before; the last: diagonal blocks
SHORT = 256  # up to this many keys, one call with a (T, S) mask costs less than compaction


@dataclass
class Part:
    """One flash-kernel call: query rows over a slice of the gathered keys (`gathered`: a
    window) or of the positions (a diagonal block, or every key). mask is additive and
    broadcasts to (B, Hq, rows, keys)."""

    rows: slice
    keys: slice
    gathered: bool
    mask: torch.Tensor | None
    is_causal: bool


class Compaction:
    """The keys `keep` (B, Hkv, S) marks, gathered per (batch, key head) in position order."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.before = F.pad(keep.cumsum(-1), (1, 0))  # (B, Hkv, S + 1): marked keys before
        width = int(self.before[..., -1].max())
        # Marked keys first, in position order; the padding is the first unmarked keys.
        self.index = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[..., :width]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S, E) -> (B, Hkv, width, E): rows of x, as index_select copies them
        (torch.gather over an expanded index is several times slower on CPU)."""
        B, Hkv, S = x.shape[:3]
        rows = self.index + S * torch.arange(B * Hkv, device=x.device).view(B, Hkv, 1)
        return x.flatten(0, 2).index_select(0, rows.flatten()).view(*self.index.shape, x.size(-1))

    def scatter_add_(self, total: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Add grad (B, Hkv, width, ...) into total (B, Hkv, S, ...) at the gathered keys."""
        index = self.index.view(*self.index.shape, *[1] * (grad.dim() - 3)).expand_as(grad)
        return total.scatter_add_(2, index, grad.to(total.dtype))

    def window(self, rows: slice, start: int, stop: int, group: int, dtype: torch.dtype,
               row_positions: torch.Tensor | None = None) -> Part | None:
        """The queries `rows` over the marked keys at positions [start, stop), or None.
        With row_positions (rows,), each query sees only the keys before its position."""
        low, high = self.before[..., start], self.before[..., stop]  # (B, Hkv)
        first, last = int(low.min()), int(high.max())
        if last <= first:
            return None
        gathered = torch.arange(first, last, device=low.device)
        hidden = (gathered < low[..., None]) | (gathered >= high[..., None])  # (B, Hkv, n)
        hidden = hidden[:, :, None]  # (B, Hkv, 1, n)
        if row_positions is not None:  # (B, Hkv, rows, n)
            later = self.index[:, :, None, first:last] >= row_positions[:, None]
            hidden = hidden | later
        mask = None
        if hidden.any():
            mask = _additive(hidden.repeat_interleave(group, 1), dtype)  # (B, Hq, 1 or rows, n)
        return Part(rows, slice(first, last), True, mask, False)


def window_parts(compaction: Compaction, n_keys: int, n_queries: int, group: int,
                 dtype: torch.dtype) -> list[Part]:
    """The calls that give the last n_queries of n_keys positions every marked key before
    their diagonal block: at each level of WINDOW_BLOCKS, a block reads the marked keys
    between the start of its parent block (or position 0) and its own start."""
    offset, parts = n_keys - n_queries, []
    for level, size in enumerate(WINDOW_BLOCKS):
        parent = WINDOW_BLOCKS[level - 1] if level else None
        for s0 in range(0, n_queries, size):
            start = 0 if parent is None else offset + s0 // parent * parent
            if offset + s0 > start:
                rows = slice(s0, min(s0 + size, n_queries))
                parts.append(compaction.window(rows, start, offset + s0, group, dtype))
    return [part for part in parts if part is not None]


def diagonal_parts(keep: torch.Tensor, n_keys: int, n_queries: int, group: int,
                   dtype: torch.dtype) -> list[Part]:
    """The calls over each query's diagonal block, keeping what `keep` (B, Hkv, S) marks
    and each query's own key."""
    offset, n = n_keys - n_queries, WINDOW_BLOCKS[-1]
    blocks = -(-n_queries // n)
    own = torch.eye(n, dtype=torch.bool, device=keep.device)  # (n, n)
    kept = F.pad(keep[:, :, offset:], (0, blocks * n - n_queries)).view(*keep.shape[:2],
                                                                       blocks, 1, n)
    kept = kept if group == 1 else kept.repeat_interleave(group, 1)
    masks = _additive(~(kept | own), dtype)  # (B, Hq, blocks, n, n): all blocks at once
    parts = []
    for block, s0 in enumerate(range(0, n_queries, n)):
        size = min(n, n_queries - s0)
        parts.append(Part(slice(s0, s0 + size), slice(offset + s0, offset + s0 + size), False,
                          masks[:, :, block, :size, :size], size > 1))
    return parts


def diagonal_windows(compaction: Compaction, n_keys: int, n_queries: int, group: int,
                     dtype: torch.dtype) -> list[Part]:
    """The calls over the marked keys of each query's diagonal block that come before the
    query (its own key left out): the gate's gradient within the diagonal blocks."""
    offset, n = n_keys - n_queries, WINDOW_BLOCKS[-1]
    parts = []
    for s0 in range(0, n_queries, n):
        rows = slice(s0, min(s0 + n, n_queries))
        positions = offset + torch.arange(rows.start, rows.stop, device=compaction.index.device)
        parts.append(compaction.window(rows, offset + rows.start, offset + rows.stop, group,
                                       dtype, positions))
    return [part for part in parts if part is not None]


def masked_part(keep: torch.Tensor, n_queries: int, group: int, dtype: torch.dtype,
                own_key: bool) -> Part:
    """One call over every key, for short sequences: the causal keys that `keep` (B, Hkv, S)
    marks, and each query's own key (own_key=True: attention) or not (False: the gate's
    gradient, where the own key's weight is 1). Mask (B, Hq, T, S)."""
    S = keep.size(-1)
    positions = torch.arange(S - n_queries, S, device=keep.device)[:, None]  # (T, 1)
    keys = torch.arange(S, device=keep.device)
    causal, own = keys <= positions, keys == positions  # (T, S)
    keep = keep if group == 1 else keep.repeat_interleave(group, 1)
    visible = causal & (keep[:, :, None] | own) if own_key else causal & ~own & keep[:, :, None]
    return Part(slice(0, n_queries), slice(0, S), False, _additive(~visible, dtype), False)


def _additive(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask, a huge negative number where hidden. Finite: a row with nothing
    visible stays finite (its call's weight is then zero)."""
    huge = torch.tensor(-torch.finfo(dtype).max / 8, dtype=dtype, device=hidden.device)
    return torch.where(hidden, huge, torch.zeros((), dtype=dtype, device=hidden.device))
