"""Branches of a module, and the routed sum over them with sparse execution.

A branch (an attention path of a mixture, an FFN branch of the HyperFFN, a block's FFN)
records under its own scope and keeps its own child `LayerCache`, so two branches never
share cache names (two dot-product paths both append "k"/"v").

`routed_sum` computes `sum_i w_i(x) * gate_i(branch_i(x))` per token. When the router
chooses (top-k), a branch that splits into a `sequence_part(x, ctx)` over all tokens and
a `token_part(h)` acting on each row alone runs its `token_part` on the routed tokens
only, gathered into one (N, C) batch and scattered back (no gather when every row chose
it). The gather is `index_select`, whose backward is an `index_add`: indexing by a tensor
would backpropagate through an accumulating `index_put`, several times slower on two
threads. Other branches (attention) are computed for every token, since later tokens and the
cache need every key and value, and their output is weighted by 0 where unrouted. Such a
branch that no token of the batch chose is skipped entirely when no cache is kept; with a
cache (a decoding step) it runs with no output position wanted, so it only extends its
cache (a scheme that `computes_output_positions` then skips its queries, attention and
output projection). The result equals the dense computation with the unrouted weights
zeroed, forward and gradients.

What to run is read from the routing with one host sync per call (each branch's number
of routed rows), not one per branch: the rows are then found by `nonzero_static`. Under
torch.compile the sum is dense (every branch on every row, the unrouted weighted by 0):
the sync would break the graph at every mixture, and a one-token decoding step, whose
small ops compiling fuses, gains more from one graph than from the skipped rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from moa.layers.context import ForwardContext, at_output_positions, select_positions

if TYPE_CHECKING:
    from moa.layers.router import FeatureGates, Routing


def branch_context(ctx: ForwardContext, name: str) -> ForwardContext:
    """`ctx` scoped to the branch `name`, with the branch's child cache."""
    cache = None if ctx.cache is None else ctx.cache.child(name)
    return ctx.replace(record=ctx.record.scoped(name), cache=cache)


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
    columns = routing.weights.flatten(0, 1).t()[..., None].unbind(0)  # n x (B*T, 1)
    rows_x = produced.flatten(0, 1)  # (B*T, C)
    out = None  # (B*T, C): the first dense branch's term, or zeros before an index_add
    dense = routing.chosen is None or torch.compiler.is_compiling()
    chosen = None if dense else routing.chosen.flatten(0, 1)  # (B*T, n)
    if chosen is not None and wanted is None:  # the one sync: rows per branch
        routed = used = chosen.sum(0).tolist()
    elif chosen is not None:  # the one sync: rows (wanted) and tokens (batch) per branch
        routed, used = torch.stack((chosen.sum(0), batch_routing.chosen.flatten(0, 1).sum(0))
                                   ).tolist()

    def gate(index: int, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if feature_gates is None else feature_gates(index, inputs, y)

    def add(term: torch.Tensor) -> torch.Tensor:  # to zeros of x's dtype, without them
        return term.to(torch.promote_types(x.dtype, term.dtype)) if out is None else out + term

    for i, branch in enumerate(branches):
        branch_ctx = branch_context(ctx, f"{scope}.{i}")
        if hasattr(branch, "token_part"):
            h = branch.sequence_part(x, branch_ctx)  # (B, T, C'), every token
            h = (h if wanted is None else select_positions(h, wanted)).flatten(0, 1)
            if chosen is None or routed[i] == rows_x.size(0):
                y = gate(i, rows_x, branch.token_part(h))  # (B*T, C)
                out = add(columns[i].to(y.dtype) * y)
            elif routed[i]:
                rows = torch.nonzero_static(chosen[:, i], size=routed[i]).squeeze(1)  # (N,)
                y = gate(i, rows_x.index_select(0, rows),
                         branch.token_part(h.index_select(0, rows)))  # (N, C)
                base = torch.zeros_like(rows_x) if out is None else out
                out = base.index_add(0, rows, (columns[i].index_select(0, rows) * y).to(base.dtype))
        elif chosen is None or used[i]:
            y = gate(i, rows_x, at_output_positions(branch, x, branch_ctx).flatten(0, 1))
            out = add(columns[i].to(y.dtype) * y)  # (B*T, C)
        elif ctx.cache is not None:  # no token chose it, but later tokens read its cache
            nothing = ctx.positions.new_zeros(x.size(0), 0)  # (B, 0) output positions
            at_output_positions(branch, x, branch_ctx.replace(output_positions=nothing))
    if out is None:  # no branch ran for any row
        out = torch.zeros_like(rows_x)
    return out.view(produced.shape)
