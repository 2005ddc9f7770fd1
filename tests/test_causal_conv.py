"""The CPU kernel of the depthwise causal convolution (`moa/kernels/causal_conv.py`)
against its reference, PyTorch's grouped conv1d: outputs and gradients on fresh random
inputs, with and without history; its checks, and where the reference runs instead."""

from __future__ import annotations

import pytest
import torch

from moa.kernels import causal_conv
from moa.kernels.causal_conv import (
    compiled,
    depthwise_causal_conv,
    depthwise_causal_conv_reference,
)


def _run(conv, window, weight, history, d_y):
    window, weight = (x.detach().clone().requires_grad_() for x in (window, weight))
    y = conv(window, weight, history)
    return [y, *torch.autograd.grad(y, (window, weight), d_y)]


@pytest.mark.parametrize(("B", "S", "C", "K", "history"), [
    (3, 37, 24, 4, 0),  # training: zeros before the first position
    (2, 19, 16, 4, 3),  # a prefill after a cached window of K - 1 inputs
    (1, 9, 8, 5, 2),  # history shorter than the kernel reaches
    (2, 12, 8, 3, 7),  # history longer: its first positions are read by nothing
    (2, 1, 8, 4, 0),  # one position
    (2, 6, 8, 1, 0),  # a kernel of one tap
])
def test_the_kernel_equals_the_reference_in_float64(B, S, C, K, history):
    """Outputs and the window's and weight's gradients, to rounding, odd sizes, batch > 1."""
    assert compiled() is not None
    window = torch.randn(B, S, C, dtype=torch.float64)
    weight = torch.randn(C, K, dtype=torch.float64)
    d_y = torch.randn(B, S - history, C, dtype=torch.float64)
    got = _run(depthwise_causal_conv, window, weight, history, d_y)
    want = _run(depthwise_causal_conv_reference, window, weight, history, d_y)
    for name, g, w in zip(["y", "window", "weight"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


def test_the_kernel_equals_the_reference_in_float32():
    window, weight = torch.randn(4, 130, 96), torch.randn(96, 4)
    d_y = torch.randn(4, 130, 96)
    got = _run(depthwise_causal_conv, window, weight, 0, d_y)
    want = _run(depthwise_causal_conv_reference, window, weight, 0, d_y)
    assert got[0].dtype == torch.float32
    for name, g, w in zip(["y", "window", "weight"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4, msg=name)


def test_the_weight_gradient_is_the_same_bits_on_one_thread_and_on_four():
    """The backward sums the weight's gradient over a fixed partition of the rows."""
    window, weight = torch.randn(8, 300, 64), torch.randn(64, 4)
    d_y = torch.randn(8, 300, 64)
    threads = torch.get_num_threads()
    try:
        grads = []
        for count in (1, 4):
            torch.set_num_threads(count)
            grads.append(_run(depthwise_causal_conv, window, weight, 0, d_y))
    finally:
        torch.set_num_threads(threads)
    for one, four in zip(*grads, strict=True):
        assert torch.equal(one, four)


def test_the_kernel_reads_a_transposed_input_and_gradient():
    """Non-contiguous activations and output gradients (a transposed view) give the same
    numbers: the wrapper makes them contiguous."""
    window = torch.randn(2, 8, 11, dtype=torch.float64).transpose(1, 2)  # (2, 11, 8)
    weight = torch.randn(8, 3, dtype=torch.float64)
    d_y = torch.randn(2, 8, 11, dtype=torch.float64).transpose(1, 2)
    got = _run(depthwise_causal_conv, window, weight, 0, d_y)
    want = _run(depthwise_causal_conv_reference, window, weight, 0, d_y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_kernel_refuses_what_it_cannot_read():
    ops = compiled()
    x, weight = torch.randn(2, 5, 4), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.forward(x.transpose(1, 2), weight, 0)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.forward(x, torch.randn(5, 3), 0)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        ops.forward(x, weight.double(), 0)
    with pytest.raises(RuntimeError, match="history"):
        ops.forward(x, weight, 6)
    with pytest.raises(RuntimeError, match="d_y must be"):
        ops.backward(torch.randn(2, 4, 4), x, weight, 0)


def test_the_ops_pass_torch_library_checks():
    """Schema, fake (meta) shapes, autograd registration and dispatch, as torch.compile
    relies on them."""
    ops = compiled()
    x, weight = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    torch.library.opcheck(ops.forward.default, (x.requires_grad_(), weight.requires_grad_(), 3))
    d_y = torch.randn(2, 6, 8, dtype=torch.float64)
    torch.library.opcheck(ops.backward.default, (d_y, x.detach(), weight.detach(), 3))


def test_a_compiled_graph_calls_the_kernel_and_equals_the_reference():
    """torch.compile traces the kernel's op into one graph (no break, no reference conv),
    and the compiled forward and gradients equal the reference's."""
    graphs = []

    def backend(graph, inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, inputs)

    torch._dynamo.reset()
    compiled_conv = torch.compile(depthwise_causal_conv, backend=backend, fullgraph=True)
    window = torch.randn(2, 13, 8, dtype=torch.float64)
    weight = torch.randn(8, 4, dtype=torch.float64)
    d_y = torch.randn(2, 13, 8, dtype=torch.float64)
    got = _run(compiled_conv, window, weight, 0, d_y)
    want = _run(depthwise_causal_conv_reference, window, weight, 0, d_y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    targets = {node.target for graph in graphs for node in graph.graph.nodes}
    assert torch.ops.moa_causal_conv.forward in targets
    assert torch.nn.functional.conv1d not in targets


@pytest.fixture
def kernel_refused(monkeypatch):
    """A call of the kernel's forward fails the test."""
    compiled()

    def refused(*args):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(torch.ops.moa_causal_conv, "forward", refused)


def test_other_dtypes_run_the_reference(kernel_refused):
    """bfloat16 is not the kernel's: the reference runs."""
    window, weight = torch.randn(2, 7, 8, dtype=torch.bfloat16), torch.randn(8, 4)
    got = depthwise_causal_conv(window, weight.bfloat16())
    torch.testing.assert_close(got, depthwise_causal_conv_reference(window, weight.bfloat16()))


def test_without_a_compiler_the_reference_runs(monkeypatch, kernel_refused, no_compiler):
    """A build that fails warns, once, and the convolution runs the reference."""
    with pytest.warns(UserWarning, match="could not be built.*conv1d instead"):
        assert compiled.__wrapped__() is None
    monkeypatch.setattr(causal_conv, "compiled", lambda: None)
    window, weight = torch.randn(2, 7, 8), torch.randn(8, 4)
    torch.testing.assert_close(depthwise_causal_conv(window, weight),
                               depthwise_causal_conv_reference(window, weight))
