"""Branches of a module, and the routed sum over them with sparse execution.

A branch (an attention path of a mixture, an FFN branch of the HyperFFN, a block's FFN)
records under its own scope and keeps its own child `LayerCache`, so two branches never
share cache names (two dot-product paths both append "k"/"v").

`routed_sum` computes `sum_i w_i(x) * gate_i(branch_i(x))` per token. When the router
chooses (top-k), a branch that splits into a `sequence_part(x, ctx)` over all tokens and
a `token_part(h)` acting on each row alone runs its `token_part` on the routed tokens
only, gathered into one (N, C) batch and scattered back. Other branches (attention) are
computed for every token, since later tokens and the cache need every key and value, and
their output is weighted by 0 where unrouted; such a branch that no token of the batch
chose is skipped entirely when no cache is kept. The result equals the dense computation
with the unrouted weights zeroed, forward and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from moa.layers.context import ForwardContext, at_output_positions, select_positions

if TYPE_CHECKING:
    from moa.layers.router import FeatureGates, Routing


def branch_context(ctx: ForwardContext, name: str) -> ForwardContext:
    """`ctx` scoped to the branch `name`, with the branch's child cache."""
    cache = None if ctx.cache is None else ctx.cache.child(name)
    return replace(ctx.scoped(name), cache=cache)


def routed_sum(x: torch.Tensor, routing: Routing, branches: Sequence[nn.Module],
               ctx: ForwardContext, scope: str,
               feature_gates: FeatureGates | None = None) -> torch.Tensor:
    """x: (B, T, C) -> (B, T, C): the branches' outputs weighted by `routing`.

    Branch i runs under `branch_context(ctx, f"{scope}.{i}")`; `feature_gates` (FiLM per
    branch) act on each branch's output where given. With ctx.output_positions (B, K) the
    result is those positions' only, (B, K, C); `routing` is every token's either way, so a
    branch that some token of the batch chose runs (and records) as in the full forward.
    """
    wanted = ctx.output_positions
    produced = x if wanted is None else select_positions(x, wanted)  # (B, T or K, C)
    batch_routing, routing = routing, routing if wanted is None else routing.at(wanted)
    weights = routing.weights.flatten(0, 1)  # (B*T, n)
    rows_x = produced.flatten(0, 1)  # (B*T, C)
    out = torch.zeros_like(rows_x)

    def gate(index: int, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if feature_gates is None else feature_gates(index, inputs, y)

    for i, branch in enumerate(branches):
        branch_ctx = branch_context(ctx, f"{scope}.{i}")
        chosen = None if routing.chosen is None else routing.chosen[..., i].flatten()  # (B*T,)
        if hasattr(branch, "token_part"):
            h = branch.sequence_part(x, branch_ctx)  # (B, T, C'), every token
            h = (h if wanted is None else select_positions(h, wanted)).flatten(0, 1)
            rows = None if chosen is None else chosen.nonzero().squeeze(1)  # (N,)
            if rows is None:
                y = gate(i, rows_x, branch.token_part(h))  # (B*T, C)
                out = out + weights[:, i, None].to(y.dtype) * y
            elif rows.numel():
                y = gate(i, rows_x[rows], branch.token_part(h[rows]))  # (N, C)
                out = out.index_add(0, rows, (weights[rows, i, None] * y).to(out.dtype))
        elif chosen is None or ctx.cache is not None or batch_routing.chosen[..., i].any():
            y = gate(i, rows_x, at_output_positions(branch, x, branch_ctx).flatten(0, 1))
            out = out + weights[:, i, None].to(y.dtype) * y  # (B*T, C)
    return out.view(produced.shape)
