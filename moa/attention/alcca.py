"""ALCCA: Barnes-Hut-style nearest-neighbour attention, causal and trainable.

For query i over the keys j <= i of its head (in the head's metric space, as metric
attention maps them): if ||q_i - c_i|| < theta, where c_i is those keys' centre of mass,
the output is the mean of their values (the far-field approximation); otherwise the
min(k, i + 1) nearest keys by Euclidean distance d_ij are found by the `index` backend
(`moa/kernels/neighbours.py`) and their values averaged with weights 1 / (d_ij + eps)
(`weighting=inverse_distance`, the ALCCA card's rule) or softmax(-alpha d_ij^2)
(`weighting=softmax`, metric attention restricted to the neighbours). Under
`key_norm=ignore` with softmax weighting, as metric attention's scores lose the
-alpha ||k||^2 term, the neighbours are the keys of largest q.k and their weights
softmax(2 alpha q.k); inverse_distance has no score and keeps distances. The spec is
`moa/kernels/alcca_reference.py`; the centres come from running sums, never an L x L tensor.

Gradients: through the chosen neighbours, q, k, v and alpha get exact gradients of the
weighted average (distances to the chosen keys are recomputed with autograd). Nothing
flows through the choices themselves: not the top-k selection (keys outside a query's
neighbours get no gradient from it), not the theta test (which branch a query takes),
and theta, k and eps are not learned. A query in the centre-of-mass branch passes
gradient only to the values (the mean); its q and the keys get none from it.

The module is metric attention's (`MetricAttention`) with another forward: the same
projections, metric map and alpha, under the same state-dict keys, so a trained metric
model loads into ALCCA unchanged (`moa/models/retrofit.py`). The KV cache holds the keys (metric
space) and values; `cache.state` holds the growing neighbour index and the running sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from moa.attention.heads import HeadsConfig
from moa.attention.metric import MetricAttention, MetricAttentionConfig, MetricConfig
from moa.attention.registry import ATTENTION
from moa.kernels.alcca_reference import (
    WEIGHTINGS,
    by_inner_product,
    neighbour_weights,
    pair_distance_sq,
)
from moa.kernels.neighbours import INDEXES, IndexOptions, faiss_available
from moa.layers.context import select_positions
from moa.schema import check, check_choice

if TYPE_CHECKING:
    from moa.config import ModelConfig
    from moa.layers.context import ForwardContext


@dataclass
class AlccaConfig(HeadsConfig):
    name: str = "alcca"
    metric: MetricConfig = field(default_factory=MetricConfig)
    alpha_init: float | None = None  # None: 1 / (2 sqrt(head_dim)), as metric attention
    learn_alpha: bool = True
    key_norm: str = "ignore"  # as metric attention's
    k: int = 32  # nearest keys per query
    theta: float = 0.0  # centre-of-mass radius; 0 never takes the mean
    eps: float = 1e-6  # inverse_distance: 1 / (d + eps)
    weighting: str = "softmax"
    index: str = "exact"
    index_options: IndexOptions = field(default_factory=IndexOptions)
    block: int = 1024  # queries per block when averaging neighbours (memory block*k*D)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.dropout == 0.0, "dropout", self.dropout, "0.0 (ALCCA has no dropout)")
        self.metric_attention()  # checks the fields it shares (alpha_init, key_norm, ...)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check(self.k > 0, "k", self.k, "a positive integer")
        check(self.theta >= 0, "theta", self.theta, ">= 0")
        check(self.eps > 0, "eps", self.eps, "a positive float")
        check(self.block > 0, "block", self.block, "a positive integer")
        check_choice("index", self.index, tuple(INDEXES))
        check(self.index == "exact" or faiss_available(), "index", self.index,
              "exact, or install faiss (pip install 'moa[faiss]')", "faiss is not installed")

    def metric_attention(self) -> MetricAttentionConfig:
        """The metric-attention config whose parameters ALCCA shares."""
        return MetricAttentionConfig(n_q_heads=self.n_q_heads, n_kv_heads=self.n_kv_heads,
                                     bias=self.bias, metric=self.metric,
                                     alpha_init=self.alpha_init, learn_alpha=self.learn_alpha,
                                     key_norm=self.key_norm, impl="eager")


@ATTENTION.register("alcca", AlccaConfig)
class AlccaAttention(MetricAttention):
    bidirectional = False  # its neighbour search is causal

    def __init__(self, config: AlccaConfig, model: ModelConfig) -> None:
        super().__init__(config.metric_attention(), model)
        self.alcca = config
        # The exact index searches queries at any positions; the FAISS indexes are searched
        # in position order, so `at_output_positions` keeps the wanted rows of a full forward.
        self.computes_output_positions = config.index == "exact"
        self.inner_product = by_inner_product(config.weighting, config.key_norm)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); causal over the cached and the new positions. With
        ctx.output_positions (B, K) (exact index), only those positions search and average:
        -> (B, K, C); the centre-of-mass statistic is still every query's."""
        q, k, v = self.positioned_heads(x, ctx)  # (B, Hq, T, D), (B, Hkv, T, D) x2
        self._record_scale(ctx)
        B, Hq, T, D = q.shape
        G, Hkv = self.group, k.size(1)
        state: dict[str, Any] = {} if ctx.cache is None else ctx.cache.state
        if "index" not in state:
            state["index"] = INDEXES[self.alcca.index](
                D, self.alcca.index_options, inner_product=self.inner_product)
        index = state["index"]
        start = len(index)  # positions seen before this call
        centre = _prefix_mean(state, "key_sum", k, start)  # (B, Hkv, T, D)
        value_mean = _prefix_mean(state, "value_sum", v, start)  # (B, Hkv, T, D)
        new_keys = k.flatten(0, 1)  # (N, T, D), N = B * Hkv
        if ctx.cache is not None:
            k, v = ctx.cache.append("k", k), ctx.cache.append("v", v)  # (B, Hkv, S, D)

        queries = q.unflatten(1, (-1, G)).transpose(2, 3)  # (B, Hkv, T, G, D)
        near = (queries - centre[:, :, :, None].to(q.dtype)).norm(dim=-1) < self.alcca.theta
        if ctx.record.wants_stats:
            ctx.record.stat("centre_fraction", near.float().mean())  # (B, Hkv, T, G) averaged
        positions = (start + torch.arange(T, device=x.device)).repeat_interleave(G)  # (T*G,)
        if ctx.output_positions is not None:  # (B, K): those queries only

            def wanted(t: torch.Tensor) -> torch.Tensor:  # (B, Hkv, T, ...) -> (B, Hkv, K, ...)
                return select_positions(t.transpose(1, 2), ctx.output_positions).transpose(1, 2)

            queries, near, value_mean = wanted(queries), wanted(near), wanted(value_mean)
            positions = ctx.positions[ctx.output_positions].repeat_interleave(G, dim=1)
            positions = positions.repeat_interleave(Hkv, dim=0)  # (N, K*G)
        Tq = queries.size(2)
        top_k = min(self.alcca.k, start + T)
        flat_queries = queries.flatten(0, 1).flatten(1, 2)  # (N, Tq*G, D)
        if x.device.type == "meta":  # a shape-only pass (FLOP counting) does not search
            ids = torch.zeros(B * Hkv, Tq * G, top_k, dtype=torch.long, device=x.device)
        else:
            ids = search_neighbours(index, flat_queries, new_keys, positions, G,
                                    top_k)  # (N, Tq*G, k)
        alpha = self.log_alpha.exp().view(-1, 1, G).expand(-1, Tq, G)  # (Hkv, Tq, G)
        y = neighbour_average(flat_queries, k.flatten(0, 1), v.flatten(0, 1), ids,
                              alpha.flatten(1).repeat(B, 1), self.alcca.weighting,
                              self.alcca.eps, self.alcca.block, self.inner_product)
        y = y.view(B, Hkv, Tq, G, D)
        y = torch.where(near[..., None], value_mean[:, :, :, None].to(y.dtype), y)
        return self.heads.merge(y.transpose(2, 3).reshape(B, Hq, Tq, D))  # (B, Tq, C)


def _prefix_mean(state: dict[str, Any], name: str, x: torch.Tensor, start: int) -> torch.Tensor:
    """Mean of x over positions 0..t for each new position t, from a running float64 sum
    kept in `state[name]` (B, H, D): x (B, H, T, D) -> (B, H, T, D)."""
    sums = x.double().cumsum(2)  # (B, H, T, D)
    if name in state:
        sums = sums + state[name][:, :, None]
    state[name] = sums[:, :, -1].detach()
    counts = start + torch.arange(1, x.size(2) + 1, device=x.device, dtype=sums.dtype)
    return sums / counts[:, None]


def search_neighbours(index: Any, queries: torch.Tensor, keys: torch.Tensor,
                      positions: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """Add the new keys (N, T, D) chunk by chunk, each time searching the queries (N, T*G, D)
    of the chunk's positions (T*G,), so every query finds its neighbours among keys up to
    its own position. -> ids (N, T*G, k), -1 where fewer than k keys are visible. Queries
    at positions (N, M) per head (an exact index's) are searched at once, after every key."""
    if positions.dim() == 2:
        index.add(keys)
        return index.search(queries.detach(), positions, k)
    found = []
    for begin in range(0, keys.size(1), index.chunk):
        end = min(begin + index.chunk, keys.size(1))
        index.add(keys[:, begin:end])
        rows = slice(begin * group, end * group)
        found.append(index.search(queries[:, rows].detach(), positions[rows], k))
    return torch.cat(found, dim=1)


def neighbour_average(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      ids: torch.Tensor, alpha: torch.Tensor, weighting: str, eps: float,
                      block: int, inner_product: bool = False) -> torch.Tensor:
    """Weighted average of each query's chosen values, differentiable in queries (N, M, D),
    keys and values (N, S, D) and alpha (N, M); ids (N, M, k), -1 for none -> (N, M, D);
    `inner_product` scores by 2 q.k, without the keys' norms (`pair_distance_sq`).
    Computed `block` queries at a time. Softmax weighting over at most k * D keys takes
    `_dense_softmax_average`: two matmuls over all S keys, no (M, k, D) tensor, and under
    autograd it keeps its (N, M, S) weights for the backward, as eager attention keeps its
    probabilities (M * S <= M * k * D floats). Otherwise `_gathered_average`: O(M * k * D)
    memory and elementwise work per block, so under autograd each block is checkpointed and
    only the ids are kept."""
    dense = weighting == "softmax" and keys.size(1) <= ids.size(-1) * keys.size(-1)
    checkpointed = not dense and torch.is_grad_enabled() and any(
        t.requires_grad for t in (queries, keys, values, alpha))
    out = []
    for begin in range(0, queries.size(1), block):
        rows = slice(begin, begin + block)
        if dense:
            average, part = _dense_softmax_average, (queries[:, rows], keys, values, ids[:, rows],
                                                     alpha[:, rows], inner_product)
        else:
            average, part = _gathered_average, (queries[:, rows], keys, values, ids[:, rows],
                                                alpha[:, rows], weighting, eps, inner_product)
        out.append(checkpoint(average, *part, use_reentrant=False) if checkpointed
                   else average(*part))
    return torch.cat(out, dim=1)


def _dense_softmax_average(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           ids: torch.Tensor, alpha: torch.Tensor,
                           inner_product: bool = False) -> torch.Tensor:
    """softmax(-alpha d^2) over the chosen keys, from one (N, m, S) product: since
    -alpha ||q - k||^2 = alpha (2 q.k - ||k||^2) - alpha ||q||^2 and the last term is the same
    for all of a query's keys, the chosen keys' scores are gathered from 2 q.K - ||K||^2 (no
    cancellation against ||q||^2; 2 q.K by inner product), and their weights scattered
    back onto the S keys."""
    valid = ids >= 0
    index = ids.clamp_min(0)  # (N, m, k)
    logits = 2 * queries @ keys.mT  # (N, m, S)
    if not inner_product:
        logits = logits - keys.pow(2).sum(-1)[:, None]
    scores = (alpha[..., None] * logits.gather(-1, index)).masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1).masked_fill(~valid, 0.0)  # (N, m, k)
    dense = torch.zeros_like(logits).scatter_add_(-1, index, weights)  # (N, m, S)
    return dense.to(values.dtype) @ values  # (N, m, D)


def _gathered_average(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      ids: torch.Tensor, alpha: torch.Tensor, weighting: str,
                      eps: float, inner_product: bool = False) -> torch.Tensor:
    N, m, k = ids.shape
    flat = ids.clamp_min(0).view(N, m * k, 1).expand(-1, -1, keys.size(-1))  # (N, m*k, D)
    chosen_k = keys.gather(1, flat).view(N, m, k, -1)  # (N, m, k, D)
    chosen_v = values.gather(1, flat).view(N, m, k, -1)
    distance_sq = pair_distance_sq(queries[:, :, None], chosen_k, inner_product)  # (N, m, k)
    weights = neighbour_weights(distance_sq, alpha, weighting, eps, ids >= 0)
    return (weights[..., None].to(chosen_v.dtype) * chosen_v).sum(-2)  # (N, m, D)
