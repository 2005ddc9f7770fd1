"""The CPU kernel over the keys a ball keeps (`moa/kernels/pruned_attention.py`): what it
reads, its dtypes, its checks, and the fallback where it cannot be built. Its exactness
against the reference, through the balls, is in test_metric_kernels.py."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import ninja
import pytest
import torch

from moa.kernels import extension, metric_cpu, pruned_attention
from moa.kernels.extension import build
from moa.kernels.metric_cpu import metric_attention_cpu
from moa.kernels.metric_reference import metric_attention_eager
from moa.kernels.pruned_attention import SOURCE, KeptKeys, compiled
from tests.test_metric_kernels import _ball_inputs, _ball_run, _inputs, _run, small_blocks


def _gradients(inputs, gate, band, d_out):
    q, k, v, alpha = inputs
    out = metric_attention_cpu(q, k, v, k.pow(2).sum(-1), alpha, gate, band)
    return [out, *torch.autograd.grad(out, [q, k, v, alpha, gate], d_out)]


@pytest.mark.parametrize("rows", [4, 128])
def test_far_keys_are_never_read(rows, monkeypatch):
    """Decoding shapes (T < S), so the first S - T keys are no query's own key. NaN in the
    far ones (neither kept nor in the band) changes nothing: not the output, not a
    gradient. The forward gathers the kept keys, the backward's extra pass the band's
    pruned keys, and nothing else is gathered."""
    B, Hq, Hkv, T, S, D = 2, 4, 2, 24, 96, 8
    inputs, balls = _ball_inputs(B, Hq, Hkv, T, S, D, kept=0.25)
    gate, band = balls(inputs[1])
    gate = gate.detach().requires_grad_()
    kept = gate.detach() > 0
    far = ~kept & ~band
    far[..., S - T:] = False  # own keys are read, kept or not
    assert far.any() and (band & ~kept).any()
    d_out = torch.randn_like(inputs[0])
    with small_blocks(rows):
        clean = _gradients(inputs, gate, band, d_out)
        poisoned_inputs = [x.detach().clone().requires_grad_() for x in inputs]
        with torch.no_grad():
            for x in poisoned_inputs[1:3]:
                x[far] = float("nan")
        marked = []
        original = KeptKeys.marked.__func__
        monkeypatch.setattr(KeptKeys, "marked", classmethod(
            lambda cls, keep: marked.append(keep.clone()) or original(cls, keep)))
        poisoned = _gradients(poisoned_inputs, gate, band, d_out)
    for name, got, want in zip(["out", "q", "k", "v", "alpha", "gate"], poisoned, clean,
                               strict=True):
        if name == "k":  # ||k||^2's own backward makes 2 NaN x 0 at the far keys
            got, want = got[~far], want[~far]
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert len(marked) == 2
    assert torch.equal(marked[0], kept) and torch.equal(marked[1], band & ~kept)


def test_bfloat16_within_twice_eager():
    """bfloat16 heads run in float32 and come back in bfloat16: against float64, the
    output's error is at most twice eager's in bfloat16, keys with large norms included,
    and every input gets its dtype back, its gradient within twice eager's error."""
    inputs = _inputs(2, 4, 2, 41, 41, 32, gated=True)
    with torch.no_grad():
        inputs[1].mul_(4.0)  # ||k||^2 ~ 130: the key-norm bias needs its hi/lo split
        inputs[3].copy_(inputs[1].pow(2).sum(-1))
        inputs[4].fill_(0.05)
    low = [t.detach().bfloat16().requires_grad_() for t in inputs]
    low[3] = inputs[3].detach().float().requires_grad_()  # the module's key norms: float32
    d_out = torch.randn_like(inputs[0])
    exact, exact_grads = _run(metric_attention_eager, inputs, d_out)
    eager, eager_grads = _run(metric_attention_eager, low, d_out.bfloat16())
    with small_blocks():
        fused, fused_grads = _run(metric_attention_cpu, low, d_out.bfloat16())
    assert fused.dtype == torch.bfloat16
    assert (fused.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max()
    for name, got, eager_grad, want, leaf in zip(["q", "k", "v"], fused_grads, eager_grads,
                                                 exact_grads, low, strict=False):
        assert got.dtype == leaf.dtype, name
        error, eager_error = ((x.double() - want).abs().max() for x in (got, eager_grad))
        assert error <= 2 * eager_error, f"d{name}"


@pytest.mark.parametrize("rows", [4, 128])
def test_float32_through_the_balls_within_twice_eager(rows):
    """In float32 (the vectorised exp of the kernel's float path, which float64 does not
    take), the output and every gradient, the radius's and the origin's included, err
    against float64 within 4x of eager code in float32, which sums in another order, plus
    1e-6 (8 float32 epsilons) of the largest value: the radius's gradient sums thousands of
    terms that cancel, so with 1e-7 one draw in fifty failed (7.8x eager's error at
    worst; 2.4x at worst over 600 draws with 1e-6)."""
    inputs, balls = _ball_inputs(2, 4, 2, 45, 45, 16, kept=0.4)
    d_out = torch.randn_like(inputs[0])
    exact = _ball_run(metric_attention_eager, inputs, balls, d_out)
    low_inputs = [x.detach().float().requires_grad_() for x in inputs]
    low_balls = copy.deepcopy(balls).float()
    eager = _ball_run(metric_attention_eager, low_inputs, low_balls, d_out.float())
    with small_blocks(rows):
        fused = _ball_run(metric_attention_cpu, low_inputs, low_balls, d_out.float())
    assert torch.equal(fused[2], eager[2])  # the same gate
    names = ["out", "q", "k", "v", "alpha", "radius", "origin"]
    for name, got, eager_value, want in zip(names, [fused[0], *fused[1]],
                                            [eager[0], *eager[1]], [exact[0], *exact[1]],
                                            strict=True):
        error, eager_error = ((x.double() - want).abs().max() for x in (got, eager_value))
        assert error <= 4 * (eager_error + 1e-6 * want.abs().max()), name


def test_the_kernel_refuses_what_it_cannot_read():
    """Heads of two dtypes or widths, positions or key biases of another shape, a bias
    factor per key head instead of per query head, or no rows per block: an error that
    says what was expected, before anything is read."""
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 1, 5, 8)
    bias, scale = torch.randn(1, 1, 5), torch.randn(2)
    positions = torch.arange(5).view(1, 1, 5)
    ops = compiled()

    def forward(**changes):
        given = dict(q=q, kc=k, vc=k, bc=bias, positions=positions, k=k, v=k, bias=bias,
                     scale=scale, block_rows=4) | changes
        return ops.forward(*given.values())

    forward()  # as given, it runs
    with pytest.raises(RuntimeError, match="one dtype and E"):
        forward(kc=k.double())
    with pytest.raises(RuntimeError, match="one dtype and E"):
        forward(v=k[..., :4].contiguous())
    with pytest.raises(RuntimeError, match=r"positions \(B, Hkv, W\) int64"):
        forward(positions=positions[..., :3])
    with pytest.raises(RuntimeError, match=r"key biases \(B, Hkv, W\) and \(B, Hkv, S\)"):
        forward(bc=bias[..., :3].contiguous())
    with pytest.raises(RuntimeError, match=r"bias scale \(Hq,\)"):
        forward(scale=scale[:1])
    with pytest.raises(RuntimeError, match="block_rows must be positive"):
        forward(block_rows=0)


def test_the_build_finds_ninja_where_the_system_has_none(monkeypatch, tmp_path):
    """An environment that is not activated: PATH without ninja. The loader finds the
    PyPI package's ninja during the build, and PATH is as it was afterwards."""
    monkeypatch.setenv("PATH", str(tmp_path))
    found = []
    monkeypatch.setattr(extension, "load",
                        lambda *args, **kwargs: found.append(shutil.which("ninja")))
    assert compiled.__wrapped__() is not None
    assert found[0] is not None and Path(found[0]).parent == Path(ninja.BIN_DIR)
    assert os.environ["PATH"] == str(tmp_path)


def test_without_a_compiler_ball_pruning_runs_the_reference(monkeypatch, no_compiler):
    """A build that fails warns, once, and the gated calls run the eager reference: the
    same numbers, the gate's gradient included."""
    with pytest.warns(UserWarning, match="could not be built"):
        assert compiled.__wrapped__() is None
    monkeypatch.setattr(pruned_attention, "compiled", lambda: None)
    inputs = _inputs(1, 2, 1, 9, 9, 8, gated=True)
    d_out = torch.randn_like(inputs[0])
    got, got_grads = _run(metric_attention_cpu, inputs, d_out)
    want, want_grads = _run(metric_attention_eager, inputs, d_out)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_one_query_without_gradients_is_one_masked_call(n_kv, dtype, monkeypatch):
    """A decoding step (one query, the last of S positions) without gradients: the keys
    the gate keeps and the query's own, pruned or not, with the key-norm bias, equal the
    reference within its dtype (float64: to rounding; bfloat16: within twice eager's
    error), batch 2, GQA, kept fractions 0 to 1, and the pruned kernel is not called."""
    monkeypatch.setattr(metric_cpu, "pruned_attention", None)  # calling it would fail
    for kept in (0.0, 0.3, 1.0):
        q, k, v, k_norm, alpha, _ = _inputs(2, 4, n_kv, 1, 37, 8, gated=False)
        gate = (torch.rand(k_norm.shape) < kept).double()
        gate[0, 0, -1] = 0.0  # the query's own key pruned: still attended
        with torch.no_grad():
            exact = metric_attention_eager(q, k, v, k_norm, alpha, gate)
            wide = torch.promote_types(dtype, torch.float32)  # the module's norms and alpha
            low = [x.to(dtype) for x in (q, k, v)] + [k_norm.to(wide), alpha.to(wide)]
            got = metric_attention_cpu(*low, gate.to(dtype))
            eager = metric_attention_eager(*low, gate.to(dtype))
        assert got.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)
        else:
            error = (got.double() - exact).abs().max()
            assert error <= 2 * (eager.double() - exact).abs().max() + 1e-3, kept


def test_with_gradients_one_query_takes_the_pruned_kernel():
    """The masked call has no gate gradient: a query that needs gradients still goes
    through the pruned kernel, whose gradients equal the reference's."""
    inputs = _inputs(1, 4, 2, 1, 21, 8, gated=True)
    d_out = torch.randn_like(inputs[0])
    expected, expected_grads = _run(metric_attention_eager, inputs, d_out)
    out, grads = _run(metric_attention_cpu, inputs, d_out)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    for name, grad, want in zip("q k v k_norm alpha gate".split(), grads, expected_grads,
                                strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-8, msg=name)


def test_the_aten_products_fallback_equals_the_blas_products():
    """Where the process links no BLAS gemm, the kernel multiplies with ATen's products: that
    build (forced with -DMOA_PRUNED_ATEN_PRODUCTS, under another op namespace) gives the
    default build's outputs and gradients, float64 and float32, GQA and T < S."""
    build("moa_pruned_attention_aten", SOURCE,
          ("-DMOA_PRUNED_ATEN_PRODUCTS", "-DMOA_PRUNED_NAMESPACE=moa_pruned_aten"))
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        q = torch.randn(2, 4, 40, 16, dtype=dtype)
        k, v = torch.randn(2, 2, 2, 70, 16, dtype=dtype)
        bias, scale = torch.rand(2, 2, 70, dtype=dtype), -torch.rand(4, dtype=dtype)
        kept = KeptKeys.marked(torch.rand(2, 2, 70) < 0.6)
        gathered = (kept.gather(k), kept.gather(v), kept.gather(bias), kept.positions)
        outputs = {}
        for name, ops in (("moa_pruned", compiled()), ("moa_pruned_aten",
                                                        torch.ops.moa_pruned_aten)):
            out, lse = ops.forward(q, *gathered, k, v, bias, scale, 16)
            d_out = torch.randn(q.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            outputs[name] = (out, lse, *ops.backward(d_out, q, *gathered, k, v, bias, scale,
                                                     out, lse, False, 16))
        for blas, aten in zip(outputs["moa_pruned"], outputs["moa_pruned_aten"], strict=True):
            torch.testing.assert_close(aten, blas, rtol=tolerance, atol=tolerance)


def test_under_torch_compile_the_kernel_runs_eagerly_between_graphs():
    """A compiled graph breaks only where the kernel runs (its kept keys size its
    buffers), never by tracing into the build; outputs and gradients stay the
    reference's."""
    inputs = _inputs(2, 4, 2, 11, 11, 8, gated=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(metric_attention_cpu)(*inputs)
    reasons = [str(entry.reason) for entry in explained.break_reasons]
    assert reasons and all("disable" in reason for reason in reasons), reasons
    d_out = torch.randn_like(inputs[0])
    got, got_grads = _run(torch.compile(metric_attention_cpu, backend="aot_eager"), inputs, d_out)
    want, want_grads = _run(metric_attention_eager, inputs, d_out)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-9)
