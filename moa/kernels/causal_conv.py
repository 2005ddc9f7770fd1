"""The depthwise causal convolution over time (the local-conv path's and the HyperFFN conv
branch's), on CPU a kernel of ours (`causal_conv.cpp`) beside its reference, PyTorch's
grouped `conv1d`:

    y[b, t, c] = sum_{j < K} w[c, j] x[b, t - (K - 1) + j, c],   zero before position 0

`depthwise_causal_conv(window, weight, history)` takes the activations as they are laid
out, (B, S, C), whose first `history` positions are a decoding cache's last inputs, and
returns the (B, S - history, C) outputs of the others. The reference transposes to
(B, C, S) and pads; oneDNN's grouped convolution then costs about 1 ms forward and
backward at the training step's (8, 128, 128) for half a million multiply-adds, where the
kernel takes 0.2 ms (2 threads). The kernel runs float32 and float64 on CPU, eager or
under torch.compile (its ops have fake implementations and a registered autograd, so a
compiled graph calls them as they are); other dtypes and devices, or a process where it
cannot be built (`moa/kernels/extension.py`), run the reference.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moa.kernels.extension import load_ops

SOURCE = Path(__file__).with_suffix(".cpp")


@functools.cache
def compiled() -> Any | None:
    """`torch.ops.moa_causal_conv` (forward, backward), built on first use and registered
    for autograd and torch.compile; None, with a warning, where it cannot be built."""
    ops = load_ops("moa_causal_conv", SOURCE, "moa_causal_conv",
                   "the causal convolutions run PyTorch's conv1d instead")
    if ops is not None:
        _register(ops)
    return ops


@torch.compiler.assume_constant_result
def built() -> bool:
    """Whether the kernel runs: under torch.compile decided once, when a graph is traced
    (tracing into the build would break the graph at every call)."""
    return compiled() is not None


def _register(ops: Any) -> None:
    """Shapes for torch.compile's tracing, and the backward as the forward's gradient."""
    torch.library.register_fake(ops.forward.default)(
        lambda x, weight, history: x.new_empty(x.size(0), x.size(1) - history, x.size(2)))
    torch.library.register_fake(ops.backward.default)(
        lambda d_y, x, weight, history: (torch.empty_like(x), torch.empty_like(weight)))

    def setup_context(ctx, inputs, output):
        x, weight, ctx.history = inputs
        ctx.save_for_backward(x, weight)

    def backward(ctx, d_y):
        x, weight = ctx.saved_tensors
        d_x, d_weight = ops.backward(d_y.contiguous(), x, weight, ctx.history)
        return d_x, d_weight, None

    torch.library.register_autograd(ops.forward.default, backward, setup_context=setup_context)


def depthwise_causal_conv_reference(window: torch.Tensor, weight: torch.Tensor,
                                    history: int = 0) -> torch.Tensor:
    """window (B, S, C), its first `history` positions the past; weight (C, K) ->
    (B, S - history, C), through `conv1d` with one group per channel."""
    left = weight.size(1) - 1 - history  # zeros before the window, or positions unread
    x = window.transpose(1, 2)  # (B, C, S)
    x = F.pad(x, (left, 0)) if left >= 0 else x[..., -left:]
    return F.conv1d(x, weight[:, None], groups=weight.size(0)).transpose(1, 2)


def depthwise_causal_conv(window: torch.Tensor, weight: torch.Tensor, history: int = 0
                          ) -> torch.Tensor:
    """window (B, S, C), its first `history` positions the past; weight (C, K) ->
    (B, S - history, C): the kernel where it runs, else the reference."""
    if (window.device.type != "cpu" or window.dtype not in (torch.float32, torch.float64)
            or weight.dtype != window.dtype or not built()):
        return depthwise_causal_conv_reference(window, weight, history)
    return torch.ops.moa_causal_conv.forward(window.contiguous(), weight.contiguous(), history)
