"""Metric attention: each head scores a key by a negative distance, `-alpha_h d(q, k)^2`.

`metric` picks d: `l2` (Euclidean), `cosine` (Euclidean between unit vectors: q and k are
normalised first) or `maha_diag` (diagonal Mahalanobis, `sum_c w_c (q_c - k_c)^2` with
learned positive w per key head: q and k are scaled by sqrt(w) first; the map, alpha and
the weights are `MetricSpace`, moa/attention/metric_space.py, which `MetricAttention`
extends). After that map every metric is Euclidean, so one kernel serves all three
(`moa/kernels/`), chosen by `impl`: `eager` (the reference, O(L^2)), `cpu_fused`
(PyTorch's fused CPU flash kernel), `triton` (flash-style Triton kernels) or `auto`
(triton on CUDA, cpu_fused otherwise).

Since -alpha ||q - k||^2 = 2 alpha q.k - alpha ||k||^2 - alpha ||q||^2 and the last term
cancels in the softmax, `key_norm` says what becomes of the middle one, a score for each
key that does not look at the query: `ignore` (the default) drops it, leaving 2 alpha q.k
over the metric-space q and k; `free` keeps it (the distance as written); `sphere` makes
it the same for every key. With it, the distance form stays on MQAR's guessing plateau
where dot products learn (docs/results.md). `alpha_init: null` (the default) is SDPA's
scale for the q.k part.

Head layout as the dot-product schemes (`n_kv_heads` for GQA/MQA): alpha is per query
head; the Mahalanobis weights and the balls describe the key space, so they are per key
head (per head under MHA). Optional ball pruning (`use_balls`, `moa/attention/balls.py`;
`ball_target_kept` moves the radii toward keeping that fraction of the keys)
and a triangle-inequality penalty (`ti_reg_weight`, `moa/layers/regularizers.py`). The KV cache
holds the metric-space keys, the values and the keys' squared norms; with balls, only
those of the keys inside their ball (`_cached`), so its bytes follow the kept fraction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moa.attention.balls import BallPruning
from moa.attention.heads import HeadsConfig, memory_keys_values
from moa.attention.metric_space import MetricSpace
from moa.attention.registry import ATTENTION
from moa.kernels.metric_bidirectional import metric_attention_bidirectional
from moa.kernels.metric_cpu import metric_attention_cpu, scaled_dot_product
from moa.kernels.metric_reference import metric_attention_eager
from moa.layers.context import select_positions
from moa.layers.kv_cache import LayerCache
from moa.layers.regularizers import ball_target_log_radius, triangle_inequality_penalty
from moa.layers.residual import Dropout
from moa.schema import check, check_choice, check_range

if TYPE_CHECKING:
    from moa.config import ModelConfig
    from moa.layers.context import ForwardContext

METRICS = ("l2", "cosine", "maha_diag")
IMPLS = ("auto", "eager", "cpu_fused", "triton")
KEY_NORMS = ("free", "sphere", "ignore")


@dataclass
class MetricConfig:
    name: str = "l2"
    maha_init: float = 1.0  # initial diagonal Mahalanobis weight (maha_diag only)

    def __post_init__(self) -> None:
        # Only ever the `metric` field of the attention config: keys named from there.
        check_choice("metric.name", self.name, METRICS)
        check(self.maha_init > 0, "metric.maha_init", self.maha_init, "a positive float")


@dataclass
class MetricAttentionConfig(HeadsConfig):
    name: str = "metric"
    metric: MetricConfig = field(default_factory=MetricConfig)
    impl: str = "auto"
    alpha_init: float | None = None  # None: metric_space.default_alpha(head_dim)
    learn_alpha: bool = True
    key_norm: str = "ignore"  # no -alpha ||k||^2 term; free: the distance; sphere: ||k|| = sqrt(D)
    use_balls: bool = False
    radius_init: float = 4.0
    learn_radius: bool = True
    ball_band: float = 0.5  # relative width of the radius' straight-through surrogate
    ball_target_kept: float | None = None  # move the radii toward keeping this fraction
    ball_target_rate: float = 0.1  # the share of the gap to the target closed per step
    origin_init_scale: float = 0.0
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    ti_reg_weight: float = 0.0
    ti_reg_samples: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.dropout == 0.0, "dropout", self.dropout, "0.0 (metric attention: attn_drop)")
        check_choice("impl", self.impl, IMPLS)
        check(self.alpha_init is None or self.alpha_init > 0, "alpha_init", self.alpha_init,
              "a positive float, or null for 1 / (2 sqrt(head_dim))")
        check_choice("key_norm", self.key_norm, KEY_NORMS)
        check(self.radius_init > 0, "radius_init", self.radius_init, "a positive float")
        check(self.ball_band > 0, "ball_band", self.ball_band, "a positive float")
        if self.ball_target_kept is not None:
            check_range("ball_target_kept", self.ball_target_kept, 0.0, 1.0, low_open=True)
            check(self.use_balls and self.learn_radius, "ball_target_kept",
                  self.ball_target_kept, "null unless use_balls and learn_radius are true",
                  "the target moves the radius of a ball")
        check_range("ball_target_rate", self.ball_target_rate, 0.0, 1.0, low_open=True)
        check(self.origin_init_scale >= 0, "origin_init_scale", self.origin_init_scale, ">= 0")
        check_range("attn_drop", self.attn_drop, 0.0, 1.0, high_open=True)
        check_range("proj_drop", self.proj_drop, 0.0, 1.0, high_open=True)
        check(self.attn_drop == 0.0 or self.impl == "eager", "attn_drop", self.attn_drop,
              "0.0 unless impl=eager", "the fused kernels have no attention dropout")
        check(self.ti_reg_weight >= 0, "ti_reg_weight", self.ti_reg_weight, ">= 0")
        check(self.ti_reg_samples > 0, "ti_reg_samples", self.ti_reg_samples, "a positive integer")

    def check_bidirectional(self) -> None:
        """Refuse what needs causal self-attention, for an encoder or a memory read."""
        check(not self.use_balls, "use_balls", self.use_balls,
              "false where attention is bidirectional or reads a memory",
              "ball pruning keeps each query's own key, which those have not")


Kernel = Callable[..., torch.Tensor]  # (q, k, v, k_norm, alpha, gate, gate_band) -> out


def select_kernel(impl: str, device: torch.device) -> Kernel:
    """The implementation for `impl` on `device` (`auto`: triton on CUDA, else cpu_fused).
    Shape-only passes on the meta device (FLOP counting) run the reference."""
    if device.type == "meta":
        return metric_attention_eager
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "cpu_fused"
    if impl == "triton":
        from moa.kernels.metric_triton import metric_attention_triton  # optional dependency

        return metric_attention_triton
    if impl == "cpu_fused" and device.type != "cpu":
        raise ValueError(f"attention.impl=cpu_fused runs on CPU only, not on {device}")
    return metric_attention_cpu if impl == "cpu_fused" else metric_attention_eager


def dot_product_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_norm: torch.Tensor,
                     alpha: torch.Tensor, gate: None, gate_band: None = None) -> torch.Tensor:
    """Metric attention with no key score (key_norm=ignore: k_norm is zero) and no balls:
    softmax(2 alpha q.k), PyTorch's dot-product attention at scale 1 over 2 alpha q. On CPU
    it skips `metric_attention_cpu`'s augmented heads (their copy of every cached key, and
    a head width of D + 3 rounded up to 8)."""
    return scaled_dot_product((2 * alpha.view(1, -1, 1, 1) * q).to(q.dtype), k, v)


@ATTENTION.register("metric", MetricAttentionConfig)
class MetricAttention(MetricSpace):
    computes_output_positions = True  # queries at ctx.output_positions only, when given
    bidirectional = True  # honours ctx.causal=False and ctx.memory (encoders, memory reads)

    def __init__(self, config: MetricAttentionConfig, model: ModelConfig) -> None:
        super().__init__(config, model)
        self.balls = None
        if config.use_balls:
            self.balls = BallPruning(self.heads.n_kv_heads, self.heads.head_dim,
                                     config.radius_init, config.learn_radius,
                                     config.origin_init_scale, config.ball_band)
        self.proj_drop = Dropout(config.proj_drop)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); causal over the cached and the new positions. With
        ctx.output_positions (B, K), only those positions attend: -> (B, K, C). Every query
        is still projected, so the triangle-inequality penalty samples the same points;
        with none (K = 0, a decoding step of a path no token chose) only the keys and values
        are, to extend the cache. Under key_norm=ignore the zero key norms are made only
        for a kernel that reads them, and never cached."""
        if ctx.memory is not None or not ctx.causal:
            return self._bidirectional(x, ctx)
        wanted = ctx.output_positions
        no_query = wanted is not None and wanted.size(1) == 0
        penalised = self.training and self.config.ti_reg_weight > 0
        dropout = self.config.attn_drop if self.training else 0.0
        kernel = self._kernel(x.device, wanted, dropout)
        fold_alpha = kernel is dot_product_form and not penalised  # the penalty's q has none
        if no_query and not penalised:
            q, (k, v) = None, self.metric_keys_values(x)  # (B, Hkv, T, D) x2
            k = ctx.position.rotate_keys(k, ctx.positions)
            v = ctx.position.scale_values(v, ctx.positions)
        else:  # (B, Hq, T, D), (B, Hkv, T, D) x2
            q, k, v = self.positioned_heads(x, ctx, fold_alpha)
        self._record_scale(ctx)
        k_norm = None if self.config.key_norm == "ignore" else self._key_norms(k)
        if penalised:
            self._triangle_penalty(q, k, ctx)
        gate = band = None
        if self.balls is not None:
            if self.training and self.config.ball_target_kept is not None:
                self._track_ball_target(k, ctx)  # before the gate reads the radii
            ball = self.balls(k)
            gate, band = ball  # (B, Hkv, T) x2
            if self.training or ctx.cache is None:  # not at generation, whose stats go unread
                ctx.record.stat("pruned_fraction", ball.pruned_fraction())
        commit = None
        if ctx.cache is not None:
            k, v, k_norm, gate, commit = self._cached(ctx.cache, k, v, k_norm, gate)
            band = None  # the gate over the held keys too; a cache is for inference
        if no_query:  # only the cache grows
            if commit is not None:
                commit()
            return x.new_zeros(x.size(0), 0, x.size(2))  # (B, 0, C)
        if fold_alpha:  # q carries its 2 alpha
            y = scaled_dot_product(q, k, v)  # (B, Hq, T, D)
        else:
            y = self._attend(kernel, q, k, v, k_norm, gate, band, wanted, dropout)
        if commit is not None:
            commit()
        return self.proj_drop(self.heads.merge(y))  # (B, T or K, C)

    def _attend(self, kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_norm: torch.Tensor | None, gate: torch.Tensor | None,
                band: torch.Tensor | None, wanted: torch.Tensor | None, dropout: float
                ) -> torch.Tensor:
        """`kernel` over q (B, Hq, T, D) and the keys k, v (B, Hkv, S, D) with alpha: every
        query, or those at `wanted` (B, K) -> (B, Hq, T or K, D)."""
        alpha = self._alpha()
        if k_norm is None and kernel is not dot_product_form:
            k_norm = self._key_norms(k)  # (B, Hkv, S) zeros
        if wanted is not None:  # K queries: the reference's (B, Hq, K, S) scores are small
            columns = k.size(2) - q.size(2) + wanted  # the queries' own keys among the S
            q = select_positions(q.transpose(1, 2), wanted).transpose(1, 2)  # (B, Hq, K, D)
            return kernel(q, k, v, k_norm, alpha, gate, dropout=dropout, query_positions=columns)
        if dropout > 0:
            return kernel(q, k, v, k_norm, alpha, gate, dropout=dropout)
        return kernel(q, k, v, k_norm, alpha, gate, band)

    def _kernel(self, device: torch.device, wanted: torch.Tensor | None, dropout: float
                ) -> Kernel:
        """The kernel of this call, chosen before q is made (`dot_product_form`'s query scale
        goes into the projection): the reference for K queries or dropout, else `impl`'s,
        or on CPU `dot_product_form` where there are no key scores and no balls."""
        if wanted is not None or dropout > 0:
            return metric_attention_eager
        kernel = select_kernel(self.config.impl, device)
        if kernel is metric_attention_cpu and self.balls is None \
                and self.config.key_norm == "ignore":
            return dot_product_form
        return kernel

    def _cached(self, cache: LayerCache, k: torch.Tensor, v: torch.Tensor,
                k_norm: torch.Tensor | None, gate: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, ...]:
        """The new keys k, v (B, Hkv, T, D), k_norm (B, Hkv, T; None: none kept) and gate
        appended to the cache: -> keys, values, norms and gate over S cached-then-new
        positions, and what to call once attention has read them (None: nothing).

        Without balls S counts every position. With balls only the keys inside their ball
        are kept, compacted per (batch, key head) (`CompactCache`): S is the longest row
        plus T, the new keys last, so the kernels' convention (queries are the last T of S,
        causal, each keeping its own key) still holds. Held keys get gate 1, a row's
        padding gate 0, the new keys their own gate; every held key precedes every query,
        so this is the uncached attention without the pruned keys' zero weights. The ball
        decides as it stands when a key is cached: the cache is for inference (a radius
        that moves later does not bring a dropped key back)."""
        entries = {"k": k, "v": v} if k_norm is None else {"k": k, "v": v, "k_norm": k_norm}
        if gate is None:
            held = {name: cache.append(name, x) for name, x in entries.items()}  # (B, Hkv, S, ...)
            return held["k"], held["v"], held.get("k_norm"), None, None
        store = cache.compact("kept_keys")
        held = store.stage(entries)
        kept = gate.detach() > 0  # (B, Hkv, T)
        gate = torch.cat([store.valid().to(gate.dtype), gate], dim=-1)  # (B, Hkv, S)
        return held["k"], held["v"], held.get("k_norm"), gate, lambda: store.commit(kept)

    def _key_norms(self, k: torch.Tensor) -> torch.Tensor:
        """||k||^2 (B, Hkv, S) in at least float32; zeros under key_norm=ignore, where
        softmax(2 alpha q.k) is dot-product attention."""
        wide = torch.promote_types(k.dtype, torch.float32)
        if self.config.key_norm == "ignore":
            return k.new_zeros(k.shape[:-1], dtype=wide)
        return k.to(wide).pow(2).sum(-1)

    def _memory_keys(self, memory: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A memory (B, M, C) -> metric-space keys, values (B, Hkv, M, D), key norms."""
        k, v = self.metric_keys_values(memory)
        return k, v, self._key_norms(k)

    def _bidirectional(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Every query over every key ctx.key_mask keeps: the input's own keys (an
        encoder) or, with ctx.memory, the memory's, without positions (queries rotated
        only). The KV cache keeps the memory's keys, projected once."""
        if ctx.memory is None:
            q, k, v = self.positioned_heads(x, ctx)  # (B, Hq, T, D), (B, Hkv, T, D) x2
            k_norm = self._key_norms(k)
        else:
            q = self.queries_to_metric_space(self.heads.queries(x))  # (B, Hq, T, D)
            q = ctx.position.rotate_queries(q, ctx.positions)
            k, v, k_norm = memory_keys_values(ctx, self._memory_keys)  # (B, Hkv, M, D) ...
        self._record_scale(ctx)
        if self.training and self.config.ti_reg_weight > 0 and ctx.memory is None:
            self._triangle_penalty(q, k, ctx)
        alpha = self._alpha()
        if self.config.impl == "eager" or self.config.attn_drop > 0:
            dropout = self.config.attn_drop if self.training else 0.0
            y = metric_attention_eager(q, k, v, k_norm, alpha, None, dropout=dropout,
                                       causal=False, key_mask=ctx.key_mask)
        else:
            y = metric_attention_bidirectional(q, k, v, k_norm, alpha, ctx.key_mask)
        y = self.heads.merge(y)  # (B, T, C)
        if ctx.output_positions is not None:
            y = select_positions(y, ctx.output_positions)
        return self.proj_drop(y)

    def _track_ball_target(self, k: torch.Tensor, ctx: ForwardContext) -> None:
        """Each training step moves every log radius a share `ball_target_rate` of the way
        to log r*, the radius that keeps `ball_target_kept` of this batch's keys k (B, Hkv,
        T, D): `log r <- log r + rate (log r* - log r)`, outside autograd, averaged over
        the processes under DDP so that every rank keeps the same radii. The optimizer
        still moves the radius by the loss's straight-through gradient in between; the
        kept fraction settles near the target. (A penalty on the gap would move it by
        the learning rate per step at most, under Adam whatever its weight: slower than
        the keys' distances move early in training.)"""
        log_target = ball_target_log_radius(self.balls.distance(k), self.config.ball_target_kept)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(log_target)
            log_target = log_target / torch.distributed.get_world_size()
        with torch.no_grad():
            gap = self.balls.log_radius - log_target.to(self.balls.log_radius.dtype)  # (Hkv,)
            self.balls.log_radius.sub_(self.config.ball_target_rate * gap)
        ctx.record.stat("ball_target_log_radius_gap", gap.mean())

    def _triangle_penalty(self, q: torch.Tensor, k: torch.Tensor, ctx: ForwardContext) -> None:
        B, Hkv, T, D = k.shape
        queries = q.view(B, Hkv, self.group, T, D).transpose(1, 2).reshape(-1, Hkv, T, D)
        points = torch.cat([queries, k], dim=0).transpose(0, 1).reshape(Hkv, -1, D)
        penalty, violating = triangle_inequality_penalty(points, self.config.ti_reg_samples)
        ctx.record.loss("ti_penalty", penalty, self.config.ti_reg_weight)
        ctx.record.stat("ti_violating_fraction", violating)


