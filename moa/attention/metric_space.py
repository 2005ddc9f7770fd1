"""Metric attention's map of q and k to the metric space, where every metric is Euclidean.

`MetricSpace` is the part of `MetricAttention` (moa/attention/metric.py) that owns the
projections and the map's parameters: alpha per query head, and under `maha_diag` the
log Mahalanobis weights per key head. It maps q and k as the metric says (`l2`: as they
are; `cosine`: normalised; `maha_diag`: scaled by sqrt(w)), puts the keys on the sphere
under `key_norm: sphere`, and then applies the position encoding. The map comes first so
that a score depends on relative positions only.

Under `l2` and `maha_diag` the map is a diagonal scale. It is folded into the rows of the
projection's weights (`QKVProjection.stacked`), and on CPU's dot-product form the query's
2 alpha is folded in as well: a product the size of a weight instead of one the size of q
or k. `to_metric_space` is the map as written, applied to projected heads (`cosine`
takes that path, and tests use it as the reference). Without autograd, alpha, sqrt(w) and
the row factors are kept between calls (`KeptValues`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moa.attention.heads import QKVProjection
from moa.layers.kept import KeptValues

if TYPE_CHECKING:
    from moa.attention.metric import MetricAttentionConfig
    from moa.config import ModelConfig
    from moa.layers.context import ForwardContext


def default_alpha(head_dim: int) -> float:
    """alpha_init: null. -alpha ||q - k||^2 = 2 alpha q.k - alpha ||k||^2 - alpha ||q||^2,
    and the last term cancels in the softmax: alpha = 1 / (2 sqrt(D)) gives the q.k part
    SDPA's scale q.k / sqrt(D)."""
    return 1.0 / (2.0 * math.sqrt(head_dim))


class MetricSpace(nn.Module):
    def __init__(self, config: MetricAttentionConfig, model: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.heads = QKVProjection(config, model)
        n_q, n_kv, D = self.heads.n_q_heads, self.heads.n_kv_heads, self.heads.head_dim
        self.group = n_q // n_kv
        alpha = default_alpha(D) if config.alpha_init is None else config.alpha_init
        log_alpha = torch.full((n_q,), math.log(alpha))
        if config.learn_alpha:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)
        self.log_maha = None
        if config.metric.name == "maha_diag":
            self.log_maha = nn.Parameter(torch.full((n_kv, D), math.log(config.metric.maha_init)))
        self.kept = KeptValues()  # alpha and the Mahalanobis scales between decoding steps

    def to_metric_space(self, q: torch.Tensor, k: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map q (B, Hq, T, D) and k (B, Hkv, T, D) to where the metric is Euclidean."""
        return self.queries_to_metric_space(q), self.keys_to_metric_space(k)

    def queries_to_metric_space(self, q: torch.Tensor) -> torch.Tensor:
        if self.config.metric.name == "cosine":
            return F.normalize(q, dim=-1)
        if self.log_maha is not None:
            q = q * self._maha_scales(q.dtype)[0]
        return q

    def keys_to_metric_space(self, k: torch.Tensor) -> torch.Tensor:
        if self.config.metric.name == "cosine":
            return F.normalize(k, dim=-1)
        if self.log_maha is not None:
            k = k * self._maha_scales(k.dtype)[1]
        return self._on_sphere(k)

    def _on_sphere(self, k: torch.Tensor) -> torch.Tensor:
        """key_norm=sphere: ||k||^2 = D, no key scores without a query."""
        if self.config.key_norm != "sphere":
            return k
        return F.normalize(k, dim=-1) * math.sqrt(k.size(-1))

    def _maha_scales(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(w) in `dtype` for the queries (Hq, 1, D), each key head's over its group,
        and for the keys (Hkv, 1, D)."""
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            scale = (0.5 * self.log_maha).exp().to(dtype)  # (Hkv, D)
            queries = scale if self.group == 1 else scale.repeat_interleave(self.group, 0)
            return queries[:, None], scale[:, None]

        return self.kept.get(f"maha {dtype}", (self.log_maha,), compute)

    def _alpha(self) -> torch.Tensor:
        """alpha (Hq,) = exp(log alpha)."""
        return self.kept.get("alpha", (self.log_alpha,), self.log_alpha.exp)

    def _query_factor(self, dtype: torch.dtype) -> torch.Tensor:
        """2 alpha (Hq, 1, 1) in `dtype`: the dot-product form's query scale."""
        return (2 * self._alpha()).to(dtype)[:, None, None]

    def _projection_rows(self, fold_alpha: bool) -> torch.Tensor | None:
        """The factors of the stacked projection's output channels (`QKVProjection.stacked`)
        that map q and k to the metric space under l2 and maha_diag: sqrt(w) for q (each
        key head's over its group) and k, 1 for v; with fold_alpha, q's also times 2 alpha
        of its head. ((Hq + 2 Hkv) D,) in the weights' dtype; None where all are 1."""
        if self.log_maha is None and not fold_alpha:
            return None
        weight = self.heads.q.weight
        Hq, Hkv, D = self.heads.n_q_heads, self.heads.n_kv_heads, self.heads.head_dim

        def compute() -> torch.Tensor:
            if self.log_maha is None:
                q_scale, k_scale = weight.new_ones(Hq * D), weight.new_ones(Hkv * D)
            else:
                q_scale, k_scale = (scale.flatten() for scale in self._maha_scales(weight.dtype))
            if fold_alpha:
                q_scale = q_scale * self._query_factor(weight.dtype).repeat_interleave(D)
            return torch.cat([q_scale, k_scale, torch.ones_like(k_scale)])

        parameters = [p for p in (self.log_maha, self.log_alpha) if p is not None]
        return self.kept.get(f"rows {weight.dtype} {fold_alpha}", parameters, compute)

    def metric_keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source (B, S, C) -> metric-space keys, values (B, Hkv, S, D), as
        `positioned_heads` makes them, before the position encoding."""
        if self.config.metric.name == "cosine":
            k, v = self.heads.keys_values(source)
            return self.keys_to_metric_space(k), v
        rows = self._projection_rows(False)
        if rows is not None:
            rows = rows[self.heads.q.out_features:]
        k, v = self.heads.keys_values(source, rows)
        return self._on_sphere(k), v

    def positioned_heads(self, x: torch.Tensor, ctx: ForwardContext, fold_alpha: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, Hq, T, D), k, v (B, Hkv, T, D): q and k mapped to the
        metric space (`to_metric_space`), q also times 2 alpha with fold_alpha, then q and k
        rotated and v scaled by the position encoding. In this order a score depends on
        relative positions only: a rotation keeps Euclidean distances, so
        ||R_i q - R_j k|| = ||q - R_(j-i) k||, whereas Mahalanobis weights applied after
        the rotation weigh the two channels of a rotated pair differently at each absolute
        position. (L2 and cosine commute with the rotation; the order matters for
        maha_diag.) Under l2 and maha_diag the maps are diagonal, folded into the
        projection's weights (`_projection_rows`): a product the size of a weight in place
        of one the size of q or k, forward and backward."""
        if self.config.metric.name != "cosine":
            q, k, v = self.heads.positioned(x, ctx, self._projection_rows(fold_alpha))
            return q, self._on_sphere(k), v
        q, k, v = self.heads.split(x)
        q, k = self.to_metric_space(q, k)
        q, k = ctx.position.rotate(q * self._query_factor(q.dtype) if fold_alpha else q, k,
                                   ctx.positions)
        return q, k, ctx.position.scale_values(v, ctx.positions)

    def _record_scale(self, ctx: ForwardContext) -> None:
        """alpha (mean over the heads) and, under maha_diag, the spread of the weights (the
        standard deviation of log w over heads and channels: 0 while every w is equal)."""
        if not self.training or not ctx.record.wants_stats:
            return
        ctx.record.stat("alpha", self.log_alpha.detach().exp().mean())
        if self.log_maha is not None:
            ctx.record.stat("maha_log_spread", self.log_maha.detach().std(correction=0))
