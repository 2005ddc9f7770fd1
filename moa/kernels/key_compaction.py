"""Causal attention over a subset of the keys, as flash-kernel calls over query blocks.

A ball prunes a key for every query (its test reads the key alone), so the pruned keys can
be dropped before attention instead of masked inside it. Per (batch, key head) the kept
keys are gathered in position order and padded to the largest count over (batch, head).
Causal order then holds block by block: for the queries [t0, t1) of a block (positions
offset + t0 onwards, offset = S - T), every kept key before offset + t0 is visible to every
query of the block, so it is one unmasked call over a prefix of the gathered keys (the
padding, and the kept keys at or after the block, are masked by a per-key additive mask);
the keys at the block's own positions, [offset + t0, offset + t1), are a square causal
call over the original keys. The calls of a block are merged by log-sum-exp.

Work: sum over blocks of (block x kept keys before it) + (block^2 / 2), about
`p L^2 / 2 + L block / 2` against `L^2 / 2` unpruned: a ratio of `p + block / L`.
Heads with very different kept fractions pay for the fullest head of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUERY_BLOCK = 128


@dataclass
class Part:
    """One flash-kernel call: the query rows, their keys, and how they are masked.

    keys is a (B, Hkv, P) index into the S positions (a prefix of the gathered keys) or a
    slice of the positions (the diagonal block, causal); mask (B, Hq, 1, P) is additive."""

    rows: slice
    keys: torch.Tensor | slice
    mask: torch.Tensor | None
    is_causal: bool

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The part's keys (or values) of x (B, Hkv, S, E): (B, Hkv, P, E)."""
        if isinstance(self.keys, slice):
            return x[:, :, self.keys]
        return torch.gather(x, 2, self.keys[..., None].expand(-1, -1, -1, x.size(-1)))

    def scatter_add(self, total: torch.Tensor, grad: torch.Tensor) -> None:
        """Add the part's key gradients grad (B, Hkv, P, E) into total (B, Hkv, S, E)."""
        if isinstance(self.keys, slice):
            total[:, :, self.keys] += grad
        else:
            index = self.keys[..., None].expand(-1, -1, -1, total.size(-1))
            total.scatter_add_(2, index, grad.to(total.dtype))


def block_parts(keep: torch.Tensor, n_queries: int, group: int, dtype: torch.dtype
                ) -> list[list[Part]]:
    """For each query block, its calls: the keys that `keep` (B, Hkv, S) marks before the
    block, gathered, then the block's diagonal. The queries are the last n_queries of S."""
    S = keep.size(-1)
    offset = S - n_queries
    block = QUERY_BLOCK
    starts = list(range(0, n_queries, block))
    # Kept keys first, each group in position order: (B, Hkv, S).
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)
    before = F.pad(keep.cumsum(-1), (1, 0))[..., [offset + t0 for t0 in starts]]  # (B,Hkv,n)
    widths = before.amax((0, 1)).tolist()
    huge = -torch.finfo(dtype).max / 8  # finite: a row with nothing before it stays finite
    blocks = []
    for number, t0 in enumerate(starts):
        t1 = min(t0 + block, n_queries)
        parts = []
        width = widths[number]
        if width > 0:
            visible = torch.arange(width, device=keep.device) < before[..., number, None]
            mask = None
            if not visible.all():
                mask = torch.zeros(visible.shape, dtype=dtype, device=keep.device)
                mask = mask.masked_fill(~visible, huge).repeat_interleave(group, 1)[:, :, None]
            parts.append(Part(slice(t0, t1), order[..., :width], mask, False))
        parts.append(Part(slice(t0, t1), slice(offset + t0, offset + t1), None, t1 - t0 > 1))
        blocks.append(parts)
    return blocks
