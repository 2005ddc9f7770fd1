"""Metric attention as flash-style Triton kernels, forward and backward (`triton`).

Same signature and numbers as `metric_attention_eager` (see `metric_reference.py`): the
score `-alpha ||q_i - k_j||^2` is computed in-kernel as `alpha (2 q_i.k_j - ||k_j||^2)`
(the `||q_i||^2` term is constant along a row and cancels in the softmax) with an online
softmax, so memory is O(L). The causal mask, the ball gate (a query always keeps its own
key) and odd lengths are applied with masks in-kernel; key blocks that are fully masked
are skipped: by causality always, by the ball gate in the forward pass and in the
backward pass too, where a block is visited only if it holds a kept key, a query's own key
or, when the gate needs a gradient, a key of the gate's band (`gate_band`: a pruned key's
gate gradient needs its scores; None: every key's).

Supported: q (B, Hq, T, D), k and v (B, Hkv, S, D) with Hq % Hkv == 0 and T <= S (the
queries are the last T positions), any T, S and D (D is padded to a power of two >= 16 by
masked loads); float16, bfloat16, float32 and float64 (float64 for tests). Scores,
softmax statistics and all accumulators are float32 (float64 for float64 inputs), and the
key norms are passed in float32, so large norms lose no precision in bfloat16: only the
q.k products see bfloat16 operands, as in ordinary attention. float32 dots use IEEE
precision (no TF32), to match the reference.

Gradients: q, k, v, k_norm, alpha and the gate (the multiplicative-weight gradient of the
reference, own key excluded); the Mahalanobis weights and the ball parameters reach their
gradients through these by autograd (`moa/attention/metric.py`, `moa/attention/balls.py`).
GQA: the key-side gradients are accumulated per query head and summed over each group.

Only tiles across the causal diagonal, past the last key or query, or under a ball gate
compute masks; every other tile is kept whole. The backward pass computes the softmax row
term `delta` in a small kernel and alpha's gradient from one partial sum per program, so
it launches four kernels and a few reductions.

Tested with Triton 3.9 (pinned `triton>=3.9,<3.10` in the `kernels` extra) on CPU under
`TRITON_INTERPRET=1`, and with Triton 3.6 (torch 2.11, CUDA 13) on an H100, where the
tests at every size ran, bfloat16 included. The launch parameters (`CUDA_LAUNCH`) were
tuned there for bfloat16 at head_dim 64; wider rows (float32, float64, head_dim > 64) get
proportionally smaller tiles. GPUs with less shared memory than Hopper's are untested.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GATE_CAP = tl.constexpr(0.0)  # as the reference: a pruned key's exp(s - lse) is at most 1


def _buffer(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer every kernel element is written to (tests poison it)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


_EVEN = {
    "EVEN_T": lambda args: args["T"] % args["BLOCK_M"] == 0,
    "EVEN_S": lambda args: args["S"] % args["BLOCK_N"] == 0,
}


@triton.jit
def _scores(q, k, kn, alpha, PRECISION: tl.constexpr):
    # alpha * (2 q.k - |k|^2): -alpha |q - k|^2 up to a per-row constant. (BLOCK_M, BLOCK_N)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return alpha * (2.0 * qk - kn[None, :])


@triton.jit
def _masks(rows, keys, offset, gate, T, S, HAS_GATE: tl.constexpr):
    # causal: key position <= query position; kept: causal and (gate or own key).
    pos = rows[:, None] + offset
    causal = (keys[None, :] <= pos) & (rows[:, None] < T) & (keys[None, :] < S)
    own = keys[None, :] == pos
    kept = causal
    if HAS_GATE:
        kept = causal & ((gate[None, :] > 0) | own)
    return causal, own, kept


@triton.jit
def _tile_masked(start_m, start_n, offset, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Without a gate, only tiles across the diagonal (or past the last key) and tiles with
    # rows past the last query need masks: every other tile is kept whole.
    return (start_n + BLOCK_N > offset + start_m + 1) | (start_m + BLOCK_M > T)


@triton.jit
def _tile_live(start_m, start_n, offset, gate, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_GATE: tl.constexpr):
    # False only when the ball prunes the whole key tile and holds no query's own key.
    live = True
    if HAS_GATE:
        own = (start_m + offset < start_n + BLOCK_N) & (start_m + BLOCK_M - 1 + offset >= start_n)
        live = (tl.max((gate > 0).to(tl.int32), axis=0) > 0) | own
    return live


@triton.heuristics(_EVEN)
@triton.jit
def _forward(Q, K, V, KN, ALPHA, GATE, OUT, LSE, T, S, Hq, Hkv, D,
             HAS_GATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_T: tl.constexpr,
             EVEN_S: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    kv = b * Hkv + h // (Hq // Hkv)
    offset = S - T
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    q = tl.load(Q + (bh * T + rows)[:, None] * D + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
    alpha = tl.load(ALPHA + h)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=alpha.dtype)
    l_i = tl.zeros([BLOCK_M], dtype=alpha.dtype)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=alpha.dtype)
    end = tl.minimum(S, offset + start_m + BLOCK_M)  # keys past the last query: masked out
    for start_n in range(0, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < S
        gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_GATE:
            gate = tl.load(GATE + kv * S + keys, mask=key_ok, other=0.0)
        if _tile_live(start_m, start_n, offset, gate, BLOCK_M, BLOCK_N, HAS_GATE):
            kv_mask = key_ok[:, None] & (dims[None, :] < D)
            k = tl.load(K + (kv * S + keys)[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + (kv * S + keys)[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
            kn = tl.load(KN + kv * S + keys, mask=key_ok, other=0.0).to(alpha.dtype)
            s = _scores(q, k, kn, alpha, PRECISION)
            if HAS_GATE:
                _, _, kept = _masks(rows, keys, offset, gate, T, S, HAS_GATE)
                s = tl.where(kept, s, float("-inf"))
            elif _tile_masked(start_m, start_n, offset, T, BLOCK_M, BLOCK_N):
                causal, _, _ = _masks(rows, keys, offset, gate, T, S, HAS_GATE)
                s = tl.where(causal, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
            p = tl.exp(s - m_safe[:, None])
            correction = tl.exp(m_i - m_safe)
            l_i = l_i * correction + tl.sum(p, axis=1)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + (bh * T + rows)[:, None] * D + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (dims[None, :] < D))
    tl.store(LSE + bh * T + rows, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _backward_delta(OUT, DO, DELTA, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta_i = sum_d out_id * dout_id, the softmax backward's row term. (BLOCK_M,)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    bh = tl.program_id(1)
    mask = (rows < T)[:, None] & (dims[None, :] < D)
    where = (bh * T + rows)[:, None] * D + dims[None, :]
    out = tl.load(OUT + where, mask=mask, other=0.0).to(DELTA.dtype.element_ty)
    do = tl.load(DO + where, mask=mask, other=0.0).to(DELTA.dtype.element_ty)
    tl.store(DELTA + bh * T + rows, tl.sum(out * do, axis=1), mask=rows < T)


@triton.heuristics(_EVEN)
@triton.jit
def _backward_keys(Q, K, V, KN, ALPHA, GATE, NEED, DO, LSE, DELTA, DK, DV, DKN, DGATE, DALPHA,
                   N_PARTIAL, T, S, Hq, Hkv, D, HAS_GATE: tl.constexpr, GATE_GRAD: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, EVEN_T: tl.constexpr, EVEN_S: tl.constexpr):
    # One key block of one query head: dk, dv, d|k|^2 and the gate gradient, per query head,
    # and this block's sum |k|^2 d|k|^2, a part of alpha's gradient. NEED (B, Hkv, S): 1 at
    # the keys whose gate gradient is wanted (kept or in the band), read with GATE_GRAD.
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    kv = b * Hkv + h // (Hq // Hkv)
    offset = S - T
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < S
    kv_mask = key_ok[:, None] & (dims[None, :] < D)
    k = tl.load(K + (kv * S + keys)[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (kv * S + keys)[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
    alpha = tl.load(ALPHA + h)
    kn = tl.load(KN + kv * S + keys, mask=key_ok, other=0.0).to(alpha.dtype)
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + kv * S + keys, mask=key_ok, other=0.0)
    need = gate  # keys whose scores this block needs: kept ones, and the band's
    if GATE_GRAD:
        need = tl.load(NEED + kv * S + keys, mask=key_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=alpha.dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=alpha.dtype)
    dkn = tl.zeros([BLOCK_N], dtype=alpha.dtype)
    dgate = tl.zeros([BLOCK_N], dtype=alpha.dtype)
    first = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M  # earlier queries: causal
    for start_m in range(first, T, BLOCK_M):
        if _tile_live(start_m, start_n, offset, need, BLOCK_M, BLOCK_N, HAS_GATE):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < T
            q_mask = row_ok[:, None] & (dims[None, :] < D)
            q = tl.load(Q + (bh * T + rows)[:, None] * D + dims[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + (bh * T + rows)[:, None] * D + dims[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
            s = _scores(q, k, kn, alpha, PRECISION)
            p_open = tl.exp(tl.minimum(s - lse[:, None], GATE_CAP))
            if HAS_GATE:
                causal, own, kept = _masks(rows, keys, offset, gate, T, S, HAS_GATE)
                p_open = tl.where(causal, p_open, 0.0)
                p = tl.where(kept, p_open, 0.0)
            else:
                if _tile_masked(start_m, start_n, offset, T, BLOCK_M, BLOCK_N):
                    causal, _, _ = _masks(rows, keys, offset, gate, T, S, HAS_GATE)
                    p_open = tl.where(causal, p_open, 0.0)
                p = p_open
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            g_open = p_open * (dp - delta[:, None])
            ds = g_open
            if HAS_GATE:
                ds = tl.where(kept, g_open, 0.0)
            dk += 2.0 * alpha * tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            dkn -= alpha * tl.sum(ds, axis=0)
            if GATE_GRAD:
                dgate += tl.sum(tl.where(own, 0.0, g_open), axis=0)
    out = (bh * S + keys)[:, None] * D + dims[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)
    tl.store(DKN + bh * S + keys, dkn, mask=key_ok)
    tl.store(DALPHA + bh * N_PARTIAL + tl.program_id(0), tl.sum(kn * dkn))
    if GATE_GRAD:
        tl.store(DGATE + bh * S + keys, tl.where(need > 0, dgate, 0.0), mask=key_ok)


@triton.heuristics(_EVEN)
@triton.jit
def _backward_queries(Q, K, V, KN, ALPHA, GATE, DO, LSE, DELTA, DQ, DALPHA, N_PARTIAL,
                      T, S, Hq, Hkv, D,
                      HAS_GATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_T: tl.constexpr,
                      EVEN_S: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    kv = b * Hkv + h // (Hq // Hkv)
    offset = S - T
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    q_mask = row_ok[:, None] & (dims[None, :] < D)
    q = tl.load(Q + (bh * T + rows)[:, None] * D + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + (bh * T + rows)[:, None] * D + dims[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
    alpha = tl.load(ALPHA + h)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=alpha.dtype)
    end = tl.minimum(S, offset + start_m + BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < S
        gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_GATE:
            gate = tl.load(GATE + kv * S + keys, mask=key_ok, other=0.0)
        if _tile_live(start_m, start_n, offset, gate, BLOCK_M, BLOCK_N, HAS_GATE):
            kv_mask = key_ok[:, None] & (dims[None, :] < D)
            k = tl.load(K + (kv * S + keys)[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + (kv * S + keys)[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
            kn = tl.load(KN + kv * S + keys, mask=key_ok, other=0.0).to(alpha.dtype)
            s = _scores(q, k, kn, alpha, PRECISION)
            p = tl.exp(s - lse[:, None])
            if HAS_GATE:
                _, _, kept = _masks(rows, keys, offset, gate, T, S, HAS_GATE)
                p = tl.where(kept, p, 0.0)
            elif _tile_masked(start_m, start_n, offset, T, BLOCK_M, BLOCK_N):
                causal, _, _ = _masks(rows, keys, offset, gate, T, S, HAS_GATE)
                p = tl.where(causal, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += 2.0 * alpha * tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + (bh * T + rows)[:, None] * D + dims[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask)
    tl.store(DALPHA + bh * N_PARTIAL + tl.program_id(0), tl.sum(q.to(dq.dtype) * dq))


# Launch parameters per kernel on CUDA: the fastest of bench/metric_triton_blocks.py's
# candidates on an H100 at L=4096, D=64, bfloat16 (docs/benchmarks.md).
CUDA_LAUNCH = {
    "forward": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "backward_keys": dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
    "backward_queries": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
}


TUNED_ROW_BYTES = 2 * 64  # a bfloat16 row at head_dim 64: what CUDA_LAUNCH was tuned for


def _config(q: torch.Tensor, kernel: str) -> dict:
    wide = q.dtype in (torch.float32, torch.float64)
    block_d = max(16, triton.next_power_of_2(q.size(-1)))
    launch = dict(CUDA_LAUNCH[kernel]) if q.is_cuda else dict(BLOCK_M=16, BLOCK_N=16)
    shrink = q.element_size() * block_d // TUNED_ROW_BYTES
    if q.is_cuda and shrink > 1:  # wider rows: tiles of the tuned bytes fit shared memory
        launch.update(BLOCK_M=max(16, launch["BLOCK_M"] // shrink),
                      BLOCK_N=max(16, launch["BLOCK_N"] // shrink), num_stages=2)
    return dict(PRECISION="ieee" if wide else "tf32", BLOCK_D=block_d, **launch)


class _MetricAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_norm, alpha, gate, gate_band):
        B, Hq, T, D = q.shape
        Hkv, S = k.size(1), k.size(2)
        acc = torch.promote_types(q.dtype, torch.float32)  # accumulator dtype
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        k_norm_dtype, alpha_dtype = k_norm.dtype, alpha.dtype
        k_norm, alpha = k_norm.to(acc).contiguous(), alpha.to(acc).contiguous()
        gate_f = None if gate is None else gate.detach().float().contiguous()
        need = None  # (B, Hkv, S): 1 where the gate's gradient is wanted
        if gate is not None and ctx.needs_input_grad[5]:
            need = torch.ones_like(gate_f) if gate_band is None else (
                (gate_f > 0) | gate_band.detach().bool()).float()
        out = _buffer((B, Hq, T, D), q, q.dtype)
        lse = _buffer((B, Hq, T), q, acc)
        config = _config(q, "forward")
        grid = (triton.cdiv(T, config["BLOCK_M"]), B * Hq)
        _forward[grid](q, k, v, k_norm, alpha, gate_f, out, lse, T, S, Hq, Hkv, D,
                       HAS_GATE=gate is not None, **config)
        ctx.save_for_backward(q, k, v, k_norm, alpha, gate_f, need, out, lse)
        ctx.dtypes = (k_norm_dtype, alpha_dtype, None if gate is None else gate.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, k_norm, alpha, gate, need, out, lse = ctx.saved_tensors
        B, Hq, T, D = q.shape
        Hkv, S = k.size(1), k.size(2)
        group = Hq // Hkv
        acc = alpha.dtype
        d_out = d_out.contiguous()
        config = _config(q, "backward_queries")
        delta = _buffer((B, Hq, T), q, acc)
        _backward_delta[(triton.cdiv(T, config["BLOCK_M"]), B * Hq)](
            out, d_out, delta, T, D, BLOCK_M=config["BLOCK_M"], BLOCK_D=config["BLOCK_D"])
        gate_grad = gate is not None and ctx.needs_input_grad[5]
        key_dtype = acc if group > 1 else k.dtype  # per query head: summed over the group
        dq = _buffer((B, Hq, T, D), q, q.dtype)
        dk, dv = _buffer((B, Hq, S, D), q, key_dtype), _buffer((B, Hq, S, D), q, key_dtype)
        dkn = _buffer((B, Hq, S), q, acc)
        dgate = _buffer((B, Hq, S), q, acc) if gate_grad else None
        # alpha's gradient, sum dS (2 q.k - |k|^2) = (sum q.dq + sum |k|^2 d|k|^2) / alpha,
        # from one partial sum per program of the two kernels: (B * Hq, query + key blocks)
        keys_config = _config(q, "backward_keys")
        query_blocks = triton.cdiv(T, config["BLOCK_M"])
        key_blocks = triton.cdiv(S, keys_config["BLOCK_N"])
        partial = _buffer((B * Hq, query_blocks + key_blocks), q, acc)
        common = (T, S, Hq, Hkv, D)
        _backward_keys[(key_blocks, B * Hq)](
            q, k, v, k_norm, alpha, gate, need, d_out, lse, delta, dk, dv, dkn, dgate,
            partial[:, query_blocks:], partial.size(1), *common,
            HAS_GATE=gate is not None, GATE_GRAD=gate_grad, **keys_config)
        _backward_queries[(query_blocks, B * Hq)](
            q, k, v, k_norm, alpha, gate, d_out, lse, delta, dq, partial, partial.size(1),
            *common, HAS_GATE=gate is not None, **config)

        def per_kv_head(x: torch.Tensor) -> torch.Tensor:  # (B, Hq, ...) -> (B, Hkv, ...)
            return x if group == 1 else x.view(B, Hkv, group, *x.shape[2:]).sum(2)

        d_alpha = partial.view(B, Hq, -1).sum((0, 2)) / alpha
        return (dq, per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype),
                per_kv_head(dkn).to(ctx.dtypes[0]), d_alpha.to(ctx.dtypes[1]),
                None if dgate is None else per_kv_head(dgate).to(ctx.dtypes[2]), None)


def metric_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_norm: torch.Tensor, alpha: torch.Tensor,
                            gate: torch.Tensor | None,
                            gate_band: torch.Tensor | None = None) -> torch.Tensor:
    """Metric attention through the Triton kernels; shapes as `metric_attention_eager`."""
    return _MetricAttention.apply(q, k, v, k_norm, alpha, gate, gate_band)
