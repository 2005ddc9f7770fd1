"""The FlexAttention formulation of metric attention (`moa/kernels/metric_flex.py`) against
the reference: on CPU (where FlexAttention has no backward) the forward and the gate's
gradient, at every key or through a ball's band; on a GPU every gradient."""

from __future__ import annotations

import warnings

import pytest
import torch

from moa.kernels.metric_flex import metric_attention_flex
from moa.kernels.metric_reference import metric_attention_eager
from tests.test_metric_kernels import _ball_inputs, _inputs

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


@pytest.mark.parametrize("case", CASES)
def test_gate_gradient_at_every_key_equals_the_reference(case):
    """No band: every key's gate, kept or pruned, gets the reference's gradient (the effect
    of its weight), from the pass that turns the roles around."""
    inputs = [t if t is None else t.detach() for t in _inputs(*case, gated=True)]
    gate = inputs[5].requires_grad_()
    d_out = torch.randn_like(inputs[0])
    want = torch.autograd.grad(metric_attention_eager(*inputs), gate, d_out)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.autograd.grad(metric_attention_flex(*inputs), gate, d_out)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got[gate == 0] != 0).any() and (got[gate == 1] != 0).any()


@pytest.mark.parametrize("kept", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("case", CASES[:2])
def test_a_learned_ball_gets_the_references_radius_and_origin_gradients(case, kept):
    """A ball with its band (the gate's gradient there only): output, and the gradients of
    the radius and the origin through the straight-through gate, as the reference's."""
    (q, k, v, alpha), balls = _ball_inputs(*case, kept)
    q, k, v, alpha = (t.detach() for t in (q, k, v, alpha))
    d_out = torch.randn_like(q)
    leaves = [balls.log_radius, balls.origin]
    results = []
    for fn in (metric_attention_eager, metric_attention_flex):
        gate, band = balls(k)
        extra = () if fn is metric_attention_eager else (band,)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(q, k, v, k.pow(2).sum(-1), alpha, gate, *extra)
        results.append((out.detach(), *torch.autograd.grad(out, leaves, d_out)))
    for got, want, name in zip(results[1], results[0], ["out", "radius", "origin"],
                               strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9, msg=f"{name} differs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gated", [False, True])
def test_forward_and_gradients_equal_the_reference_on_a_gpu(case, gated):
    """Compiled, in float32: the output and the gradients of q, k, v, the key norms, alpha
    and the gate within twice eager float32's error against float64."""
    exact = [t for t in _inputs(*case, gated=gated) if t is not None]
    low = [t.detach().float().cuda().requires_grad_() for t in exact]
    d_out = torch.randn_like(exact[0])
    want = metric_attention_eager(*exact, *[None] * (6 - len(exact)))
    want_grads = torch.autograd.grad(want, exact, d_out)
    errors = {}
    for fn in (metric_attention_eager, metric_attention_flex):
        got = fn(*low, *[None] * (6 - len(low)))
        grads = torch.autograd.grad(got, low, d_out.float().cuda())
        errors[fn] = [(x.double().cpu() - w).abs().max().item()
                      for x, w in zip([got, *grads], [want, *want_grads], strict=True)]
    for flex, eager in zip(errors[metric_attention_flex], errors[metric_attention_eager],
                           strict=True):
        assert flex <= 2 * eager + 1e-6
