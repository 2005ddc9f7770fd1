"""Causal attention over the keys a ball keeps, on CPU: a kernel of ours that reads kept
keys only (`pruned_attention.cpp`).

A ball prunes a key for every query (its test reads the key alone), so pruned keys are
dropped before attention instead of masked inside it. Per (batch, key head) the kept keys
are gathered in position order (`KeptKeys`), padded to the longest row. A score is a dot
product at scale 1 plus a bias of the key times a factor of the query head,
`q_i . k_j + c_h b_j` (metric attention's `2 alpha q.k - alpha ||k||^2`, read as it is,
with no widened copy of the heads to carry the bias: `metric_cpu.py`). A query sees the
gathered keys before its position, which is a prefix of them, and its own key, kept or
not. Blocks of ROWS queries make one matrix product over the prefix their last query sees,
and each query's softmax stops at its own prefix, so the work is about
`p L^2 / 2 + L ROWS p / 2` score pairs against `L^2 / 2` unpruned, and nothing is read of a
pruned key but as its own query's key. The backward recomputes the probabilities block by
block in the same way (dq, dk, dv, the biases' and the factors' gradients, and the gate's
gradient of the kept keys: its multiplicative weight, a query's own key excluded, as in
the reference). The gate's gradient is needed only where the ball's surrogate has a slope
(`BallGate.band`): for the band's pruned keys one more backward pass gathers them and
computes that alone. Far keys (neither kept nor in the band) cost nothing.

The kernel is compiled on first use (`moa/kernels/extension.py`, about 25 s), for float32
and float64; other dtypes run in float32. Without a C++ compiler `compiled()` warns once
and is None, and the callers fall back to the eager reference. The forward runs its query
blocks in parallel on torch's threads, the backward its (batch, key head) pairs. The
blocks' matrix products call BLAS's gemm on raw pointers where the process links one
(PyTorch's x86 wheels export MKL's), ATen's products otherwise, which build views of the
block and dispatch for each product: a cost of their own at the training length's small
blocks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from moa.kernels.extension import load_ops

ROWS = 128  # queries per block: one product each (bench/attention.py --balls chose it)
SOURCE = Path(__file__).with_suffix(".cpp")


@functools.cache
def compiled() -> Any | None:
    """`torch.ops.moa_pruned` (forward, backward), built on first use; None, with a warning,
    where it cannot be built."""
    return load_ops("moa_pruned_attention", SOURCE, "moa_pruned",
                    "ball pruning on CPU runs the eager reference instead")


@torch.compiler.assume_constant_result
def built() -> bool:
    """Whether the kernel runs: under torch.compile decided once, when a graph is traced
    (tracing into the build would break the graph at every call)."""
    return compiled() is not None


class KeptKeys:
    """Some keys per (batch, key head), in position order: `positions` (B, Hkv, W) int64,
    W the most any row holds, a row's padding at position S (past every query)."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions

    @classmethod
    def marked(cls, keep: torch.Tensor) -> KeptKeys:
        """The keys keep (B, Hkv, S) marks."""
        S = keep.size(-1)
        count = keep.sum(-1, keepdim=True)  # (B, Hkv, 1)
        width = int(count.max()) if keep.numel() else 0
        # Marked keys first, in position order (a stable sort of 0 = marked, 1 = not).
        index = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[..., :width]
        slots = torch.arange(width, device=keep.device)
        return cls(torch.where(slots < count, index, S).contiguous())

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S, E) -> (B, Hkv, W, E): the marked rows of x, padding rows repeating
        the last key (never read). (B, Hkv, S) -> (B, Hkv, W) likewise."""
        if x.dim() == 3:
            return self.gather(x[..., None]).squeeze(-1)
        B, Hkv, S = x.shape[:3]
        index = self.positions.clamp(max=S - 1)
        rows = index + S * torch.arange(B * Hkv, device=x.device).view(B, Hkv, 1)
        # index_select over flat rows: torch.gather over an expanded index is several times
        # slower on CPU.
        return x.flatten(0, 2).index_select(0, rows.flatten()).view(*index.shape, x.size(-1))


class _PrunedAttention(torch.autograd.Function):
    """(q, k, v, bias, scale, gate, band) -> out (B, Hq, T, E), all float32 or all float64:
    attention with scores q.k + scale_h bias_j over the keys gate (B, Hkv, S) keeps and
    each query's own key; the gate gets the multiplicative-weight gradient at the keys
    band marks (None: at every key)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, gate, band):
        ops = compiled()
        q, k, v, bias, scale = (x.contiguous() for x in (q, k, v, bias, scale))
        kept = KeptKeys.marked(gate.detach() != 0)
        out, lse = ops.forward(q, kept.gather(k), kept.gather(v), kept.gather(bias),
                               kept.positions, k, v, bias, scale, ROWS)
        ctx.save_for_backward(q, k, v, bias, scale, out, lse, kept.positions, gate, band)
        return out

    @staticmethod
    def backward(ctx, d_out):
        ops = compiled()
        q, k, v, bias, scale, out, lse, positions, gate, band = ctx.saved_tensors
        d_out = d_out.contiguous()

        def backward_pass(keys: KeptKeys, gate_only: bool) -> tuple[torch.Tensor, ...]:
            return ops.backward(d_out, q, keys.gather(k), keys.gather(v), keys.gather(bias),
                                keys.positions, k, v, bias, scale, out, lse, gate_only, ROWS)

        dq, dk, dv, d_gate, d_bias, d_scale = backward_pass(KeptKeys(positions), False)
        d_scale = d_scale.sum(0)  # (B, Hq) -> (Hq,)
        if not ctx.needs_input_grad[5]:
            return dq, dk, dv, d_bias, d_scale, None, None
        pruned = gate == 0
        band = torch.ones_like(pruned) if band is None else band
        d_gate = d_gate + backward_pass(KeptKeys.marked(band & pruned), gate_only=True)[3]
        return dq, dk, dv, d_bias, d_scale, d_gate.masked_fill(~band, 0.0).to(gate.dtype), None


@torch.compiler.disable  # the kept keys' count sizes its buffers: eager inside a compiled graph
def pruned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: torch.Tensor, gate: torch.Tensor, band: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Attention of q (B, Hq, T, E) over k, v (B, Hkv, S, E) with scores
    `q_i . k_j + scale_h bias_j` (bias (B, Hkv, S), scale (Hq,)), causal with the queries
    the last T of S, over the keys gate (B, Hkv, S) keeps (nonzero) and each query's own
    key. Needs `built()`. Returns q's dtype; computes in float32 at least."""
    wide = torch.promote_types(q.dtype, torch.float32)
    band = None if band is None else band.detach().bool()
    out = _PrunedAttention.apply(*(x.to(wide) for x in (q, k, v, bias, scale)), gate, band)
    return out.to(q.dtype)
