"""The FlexAttention formulation of metric attention (`moa/kernels/metric_flex.py`) against
the reference: the forward on CPU (where FlexAttention has no backward), forward and
gradients on a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from moa.kernels.metric_flex import metric_attention_flex
from moa.kernels.metric_reference import metric_attention_eager
from tests.test_metric_kernels import _inputs

CASES = [  # (B, Hq, Hkv, T, S, D): odd lengths, GQA 4/2/1, T < S, more than one block
    (2, 4, 4, 37, 37, 16), (1, 4, 2, 17, 40, 8), (2, 4, 1, 1, 23, 16), (1, 4, 2, 200, 263, 8)]


def _forward(fn, inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex_attention warns that it is slow
        return fn(*[None if t is None else t.detach() for t in inputs])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gated", [False, True])
def test_forward_equals_the_reference(case, gated):
    """Causal metric attention, with a fixed ball's 0/1 gate (each query keeps its own key)
    or none, in float64."""
    inputs = _inputs(*case, gated=gated)
    torch.testing.assert_close(_forward(metric_attention_flex, inputs),
                               _forward(metric_attention_eager, inputs), rtol=1e-9, atol=1e-9)


def test_a_gate_that_needs_a_gradient_is_refused():
    inputs = _inputs(1, 4, 2, 9, 9, 8, gated=True)
    with pytest.raises(ValueError, match="learned ball radius"):
        metric_attention_flex(*inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_the_reference_on_a_gpu(case):
    """Compiled, in float32: output and the gradients of q, k, v, the key norms and alpha
    within twice eager float32's error against float64."""
    exact = _inputs(*case, gated=False)
    low = [t.detach().float().cuda().requires_grad_() for t in exact[:5]]
    d_out = torch.randn_like(exact[0])
    want = metric_attention_eager(*exact[:5], None)
    want_grads = torch.autograd.grad(want, exact[:5], d_out)
    for fn in (metric_attention_eager, metric_attention_flex):
        got = fn(*low, None)
        grads = torch.autograd.grad(got, low, d_out.float().cuda())
        error = (got.double().cpu() - want).abs().max()
        grad_errors = [(g.double().cpu() - w).abs().max() for g, w in zip(grads, want_grads,
                                                                          strict=True)]
        if fn is metric_attention_eager:
            bound, grad_bounds = 2 * error + 1e-6, [2 * e + 1e-6 for e in grad_errors]
        else:
            assert error <= bound
            assert all(e <= b for e, b in zip(grad_errors, grad_bounds, strict=True))
