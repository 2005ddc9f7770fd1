"""Every metric-attention implementation against the float64 eager reference.

Fresh random inputs per case; forward and every gradient (q, k, v, key norms, alpha, ball
gate); odd lengths, several head dims, GQA groupings, batch > 1, with and without the
ball gate, self-attention and cached-decoding shapes (T < S). With balls (radius set to
keep a chosen fraction of the keys) the gradients reach the radius and the origin. The
Triton kernels run under `TRITON_INTERPRET=1` on CPU.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager, nullcontext

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from moa.attention.balls import BallPruning  # noqa: E402
from moa.kernels import metric_cpu, pruned_attention  # noqa: E402
from moa.kernels.metric_cpu import metric_attention_cpu  # noqa: E402
from moa.kernels.metric_flex import metric_attention_flex  # noqa: E402
from moa.kernels.metric_reference import (  # noqa: E402
    allowed_keys,
    metric_attention_eager,
    metric_scores,
)

try:
    from moa.kernels import metric_triton
except ImportError:  # triton is the optional `kernels` extra
    metric_triton = None

needs_triton = pytest.mark.skipif(metric_triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, Hq, Hkv, T, S, D): self-attention (T == S) and decoding (T < S) shapes. The
# shortest self-attention case has 2 positions: at 1 there is no mask to get wrong.
CASES = [
    (1, 1, 1, 2, 2, 16),
    (2, 4, 2, 17, 17, 16),
    (1, 4, 1, 33, 33, 24),
    (2, 2, 2, 5, 23, 64),
    (1, 3, 3, 1, 17, 32),
]
SLOW_CASES = [(2, 8, 2, 113, 113, 64), (1, 4, 4, 1023, 1023, 32), (1, 2, 1, 77, 300, 48),
              (1, 2, 2, 130, 130, 128)]


def _inputs(B, Hq, Hkv, T, S, D, gated, dtype=torch.float64, device="cpu"):
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh every call

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)
    q = draw(B, Hq, T, D) * 0.5
    k = draw(B, Hkv, S, D) * 0.5
    v = draw(B, Hkv, S, D)
    alpha = 0.2 + torch.rand(Hq, generator=generator, dtype=torch.float64)
    gate = (torch.rand(B, Hkv, S, generator=generator) > 0.4).double() if gated else None
    tensors = [q, k, v, k.pow(2).sum(-1), alpha, gate]
    return [None if t is None else t.to(device, dtype).requires_grad_() for t in tensors]


def _run(fn, inputs, d_out):
    out = fn(*inputs)
    leaves = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, leaves, d_out)


def _check(fn, case, gated, device="cpu"):
    inputs = _inputs(*case, gated, device=device)
    d_out = torch.randn_like(inputs[0])  # out has q's shape
    expected, expected_grads = _run(metric_attention_eager, inputs, d_out)
    out, grads = _run(fn, inputs, d_out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    names = [n for n, t in zip(["q", "k", "v", "k_norm", "alpha", "gate"], inputs, strict=True)
             if t is not None]
    for name, grad, want in zip(names, grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-8, msg=f"d{name} differs")


@st.composite
def shapes(draw) -> tuple[int, ...]:
    """(B, Hq, Hkv, T, S, D): any GQA grouping, T <= S (self-attention or decoding)."""
    n_kv, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T = draw(st.integers(1, 40))
    S = draw(st.one_of(st.just(T), st.integers(T, T + 40)))
    D = draw(st.sampled_from([4, 8, 12, 16, 24, 32, 40, 64]))
    return draw(st.integers(1, 2)), n_kv * group, n_kv, T, S, D


def with_fixed_cases(test):
    """Hypothesis runs CASES, gated and not, before the shapes it draws."""
    for case in CASES:
        for gated in (False, True):
            test = example(case=case, gated=gated)(test)
    return test


@settings(max_examples=40)
@given(case=shapes(), gated=st.booleans())
@with_fixed_cases
def test_cpu_fused_matches_reference(case, gated):
    _check(metric_attention_cpu, case, gated)


@needs_triton
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, gated, monkeypatch):
    def poisoned(shape, like, dtype):  # every element the kernels leave unwritten stays NaN
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)

    monkeypatch.setattr(metric_triton, "_buffer", poisoned)
    _check(metric_triton.metric_attention_triton, case, gated, DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", SLOW_CASES)
def test_implementations_match_reference_at_larger_sizes(case, gated):
    _check(metric_attention_cpu, case, gated)
    if metric_triton is not None and (DEVICE == "cuda" or case[3] < 512):  # interpreter: slow
        _check(metric_triton.metric_attention_triton, case, gated, DEVICE)


@needs_triton
def test_triton_repeat_runs_are_identical():
    inputs = _inputs(2, 4, 2, 37, 37, 32, gated=True, device=DEVICE)
    d_out = torch.randn_like(inputs[0])
    first = _run(metric_triton.metric_attention_triton, inputs, d_out)
    second = _run(metric_triton.metric_attention_triton, inputs, d_out)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


def test_fully_pruned_rows_keep_their_own_key():
    """With every key pruned, each query attends to itself alone."""
    q, k, v, k_norm, alpha, _ = _inputs(1, 2, 1, 9, 9, 16, gated=False)
    gate = torch.zeros(1, 1, 9, dtype=torch.float64)
    for fn in (metric_attention_eager, metric_attention_cpu):
        out = fn(q, k, v, k_norm, alpha, gate)
        torch.testing.assert_close(out, v.expand(1, 2, 9, 16))


needs_cuda = pytest.mark.skipif(DEVICE != "cuda" or metric_triton is None,
                                reason="the Triton kernels' low-precision paths need a GPU")
LOW_PRECISION = [("cpu_fused", "cpu"), pytest.param("triton", "cuda", marks=needs_cuda)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("impl", "device"), LOW_PRECISION)
def test_low_precision_error_within_twice_eager(impl, device, dtype):
    """The flash-attention rule: against float64, the fused error is at most twice the
    error of eager code in the same dtype (keys with large norms included)."""
    fused_fn = (metric_attention_cpu if impl == "cpu_fused"
                else metric_triton.metric_attention_triton)
    inputs = _inputs(2, 4, 2, 65, 65, 64, gated=True, device=device)
    with torch.no_grad():
        inputs[1].mul_(4.0)  # ||k||^2 ~ 250: the key-norm bias needs its hi/lo split
        inputs[3].copy_(inputs[1].pow(2).sum(-1))
        inputs[4].fill_(0.05)
        exact = metric_attention_eager(*inputs)
        low = [None if t is None else t.to(dtype) for t in inputs]
        low[3] = inputs[3].float()  # the module computes key norms in float32
        fused = (fused_fn(*low).double() - exact).abs().max()
        eager = (metric_attention_eager(*low).double() - exact).abs().max()
    assert fused <= 2 * eager + 1e-6


def test_augmented_key_norm_bias_keeps_16_bits_in_bfloat16():
    """bfloat16 keys and queries with float32 alpha and key norms (a model under autocast):
    the augmented heads' key-norm bias a ||k||^2, hi and lo parts, is exact to about 16 bits
    (the hi part alone holds 8). q = 0 leaves that bias alone in q' . k'."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    k = (torch.randn(2, 3, 11, 16, generator=generator) * 4).bfloat16()
    k_norm = k.float().pow(2).sum(-1)  # (B, H, S), float32 as the module computes it
    alpha = 0.2 + torch.rand(3, generator=generator)  # float32, not a bfloat16 number
    q = torch.zeros(2, 3, 5, 16, dtype=torch.bfloat16)
    q_aug, k_aug, _ = metric_cpu.augment(q, k, k, k_norm, alpha)
    bias = q_aug.double() @ k_aug.double().transpose(-1, -2)  # (B, H, T, S), exact products
    want = -alpha.double().view(1, -1, 1, 1) * k_norm.double()[:, :, None, :]
    assert ((bias - want).abs() / want.abs()).max() <= 2.0**-14


# (B, Hq, Hkv, T, S, D): an encoder (T == S) and a read of a memory of S slots.
BIDIRECTIONAL_CASES = [(1, 1, 1, 1, 1, 16), (2, 4, 2, 17, 17, 16), (2, 2, 1, 33, 6, 24),
                       (1, 3, 3, 5, 113, 32)]


def _key_mask(B, S):
    mask = torch.rand(B, S, generator=torch.Generator().manual_seed(torch.seed() % 2**31)) > 0.3
    mask[:, 0] = True  # every row keeps a key
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_bidirectional_reference_is_the_softmax_of_distances(masked):
    """The eager reference without a causal mask is softmax(-alpha ||q - k||^2) over the
    kept keys, written out directly."""
    q, k, v, k_norm, alpha, _ = _inputs(2, 4, 2, 7, 11, 16, gated=False)
    mask = _key_mask(2, 11) if masked else torch.ones(2, 11, dtype=torch.bool)
    keys = k.repeat_interleave(2, dim=1)
    scores = -alpha.view(1, -1, 1, 1) * torch.cdist(q, keys).pow(2)
    probs = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    expected = probs @ v.repeat_interleave(2, dim=1)
    out = metric_attention_eager(q, k, v, k_norm, alpha, None, causal=False,
                                 key_mask=mask if masked else None)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", BIDIRECTIONAL_CASES)
def test_bidirectional_matches_reference(case, masked):
    """SDPA over augmented heads (encoders, memory reads): forward and every gradient."""
    from moa.kernels.metric_bidirectional import metric_attention_bidirectional

    q, k, v, k_norm, alpha, _ = _inputs(*case, gated=False)
    mask = _key_mask(case[0], case[4]) if masked else None
    d_out = torch.randn_like(q)
    leaves = [q, k, v, k_norm, alpha]
    expected = metric_attention_eager(q, k, v, k_norm, alpha, None, causal=False, key_mask=mask)
    out = metric_attention_bidirectional(q, k, v, k_norm, alpha, mask)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    for name, grad, want in zip("q k v k_norm alpha".split(),
                                torch.autograd.grad(out, leaves, d_out),
                                torch.autograd.grad(expected, leaves, d_out), strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-8, msg=f"d{name} differs")


# Ball pruning: the fused kernels drop pruned keys (`moa/kernels/pruned_attention.py` on
# CPU) and compute the gate's gradient at the band's keys only. Blocks of 4 queries, so
# that short sequences cross many blocks.
@contextmanager
def small_blocks(rows: int = 4):
    saved, pruned_attention.ROWS = pruned_attention.ROWS, rows
    try:
        yield
    finally:
        pruned_attention.ROWS = saved


def _ball_inputs(B, Hq, Hkv, T, S, D, kept, device="cpu"):
    """Random q, k, v, alpha and a ball per key head (random origin) whose radius keeps a
    fraction `kept` of that head's keys: the ceil(kept * B * S)-th smallest distance."""
    q, k, v, _, alpha, _ = _inputs(B, Hq, Hkv, T, S, D, gated=False, device=device)
    balls = BallPruning(Hkv, D, radius_init=1.0, learn_radius=True, origin_init_scale=0.3,
                        band=0.5).to(device, torch.float64)
    with torch.no_grad():
        distance = (k - balls.origin[None, :, None]).norm(dim=-1)  # (B, Hkv, S)
        ranked = distance.transpose(0, 1).reshape(Hkv, -1).sort(dim=1).values
        balls.log_radius.copy_(ranked[:, math.ceil(kept * B * S) - 1].log())
    return [q, k, v, alpha], balls


def _ball_run(fn, inputs, balls, d_out):
    """out and the gradients of q, k, v, alpha, the radius and the origin, with the gate
    (and, for a fused kernel, its band) from the ball."""
    q, k, v, alpha = inputs
    gate, band = balls(k)
    extra = () if fn is metric_attention_eager else (band,)
    out = fn(q, k, v, k.pow(2).sum(-1), alpha, gate, *extra)
    leaves = [q, k, v, alpha, balls.log_radius, balls.origin]
    return out, torch.autograd.grad(out, leaves, d_out), gate


def _check_balls(fn, case, kept, device="cpu"):
    inputs, balls = _ball_inputs(*case, kept, device=device)
    d_out = torch.randn_like(inputs[0])
    expected, expected_grads, gate = _ball_run(metric_attention_eager, inputs, balls, d_out)
    B, S = case[0], case[4]
    assert abs(gate.mean().item() - kept) <= 1 / (B * S) + 1e-9  # the ball keeps `kept`
    out, grads, _ = _ball_run(fn, inputs, balls, d_out)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    for name, grad, want in zip(["q", "k", "v", "alpha", "radius", "origin"], grads,
                                expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-8, msg=f"d{name} differs")


KEPT_FRACTIONS = [0.1, 0.25, 0.5, 0.75, 1.0]


@st.composite
def ball_shapes(draw) -> tuple[int, ...]:
    """(B, Hq, Hkv, T, S, D): Hq = 4 over Hkv 4, 2 or 1; odd lengths; T <= S; at D = 13 the
    augmented q' and k' (D + 3 = 16 wide) have no zero column."""
    n_kv = draw(st.sampled_from([1, 2, 4]))
    T = draw(st.integers(1, 15)) * 2 + 1
    S = draw(st.one_of(st.just(T), st.integers(T, T + 30)))
    return draw(st.integers(1, 2)), 4, n_kv, T, S, draw(st.sampled_from([8, 13, 16]))


@settings(max_examples=30)
@given(case=ball_shapes(), kept=st.sampled_from(KEPT_FRACTIONS), blocks=st.booleans())
@example(case=(2, 4, 2, 33, 33, 16), kept=0.1, blocks=True)
@example(case=(2, 4, 1, 17, 40, 8), kept=0.25, blocks=True)
@example(case=(1, 4, 4, 1, 23, 8), kept=0.5, blocks=True)
@example(case=(1, 4, 2, 18, 18, 8), kept=0.5, blocks=True)  # a last block of 2 queries
@example(case=(2, 4, 2, 33, 33, 16), kept=0.25, blocks=False)
@example(case=(1, 4, 2, 21, 21, 13), kept=0.5, blocks=True)
def test_cpu_fused_ball_pruning_matches_reference(case, kept, blocks):
    """Outputs and every gradient, through the ball (radius, origin), equal the gated
    reference in float64 at kept fractions 0.1 to 1, self-attention and T < S, over many
    query blocks (of 4) and over one."""
    with small_blocks() if blocks else nullcontext():
        _check_balls(metric_attention_cpu, case, kept)


@needs_triton
@pytest.mark.parametrize(("case", "kept"), [((2, 4, 2, 33, 33, 16), 0.1),
                                           ((1, 4, 1, 9, 29, 16), 0.5)])
def test_triton_ball_pruning_matches_reference(case, kept):
    """The Triton backward visits key blocks with a kept, own or band key only."""
    _check_balls(metric_triton.metric_attention_triton, case, kept, DEVICE)


@pytest.mark.parametrize("blocks", [False, True])
def test_cpu_fused_gate_gradient_is_the_references_on_the_band_and_zero_off_it(blocks):
    """A band (the keys near a ball's surface) given with the gate: the gate's gradient is the
    reference's at the band's keys, kept or pruned, and zero at every other key."""
    case = (2, 4, 2, 19, 27, 8)
    inputs = _inputs(*case, gated=True)
    band = torch.rand(inputs[5].shape, generator=torch.Generator().manual_seed(3)) > 0.5
    assert (band & (inputs[5] == 0)).any() and (band & (inputs[5] == 1)).any()
    d_out = torch.randn_like(inputs[0])
    want = torch.autograd.grad(metric_attention_eager(*inputs), inputs[5], d_out)[0]
    with small_blocks() if blocks else nullcontext():
        got = torch.autograd.grad(metric_attention_cpu(*inputs, band), inputs[5], d_out)[0]
    torch.testing.assert_close(got[band], want[band], rtol=1e-8, atol=1e-8)
    assert (got[~band] == 0).all()


def _capped_gate_gradient(q, k, v, alpha, gate, d_out):
    """The gate gradient by its definition, in float64: for each key j of each batch row and
    key head, sum_i min(exp(s_ij - lse_i), 1) dO_i.(v_j - out_i) over the queries i that see
    it but not as their own key (MHA: a query head per key head)."""
    scores = metric_scores(q, k, k.pow(2).sum(-1), alpha)  # (B, H, T, S)
    causal, own = allowed_keys(q.size(2), k.size(2), q.device)  # (T, S) x2
    kept = causal & ((gate[:, :, None, :] > 0) | own)  # (B, H, T, S)
    lse = scores.masked_fill(~kept, float("-inf")).logsumexp(-1, keepdim=True)
    out = (scores - lse).exp().masked_fill(~kept, 0) @ v  # (B, H, T, D)
    would_be = (scores - lse).clamp(max=0).exp().masked_fill(~causal | own, 0)
    answer = d_out @ v.transpose(-1, -2) - (d_out * out).sum(-1, keepdim=True)  # (B, H, T, S)
    return (would_be * answer).sum(2), (scores - lse).masked_fill(~causal | own | kept, -1)


def test_a_pruned_keys_gate_gradient_is_its_would_be_probability_capped_at_one():
    """At a pruned key that outscores the kept ones, the derivative at gate 0 grows as
    exp(s - lse) (e^50 for a key 50 above them): every implementation caps that would-be
    probability at 1. Each equals the capped definition in float64, on keys of large norm,
    so that the cap is at work for many of them."""
    torch.manual_seed(5)
    q, k, v = (3 * torch.randn(2, 2, 24, 8, dtype=torch.float64) for _ in range(3))
    alpha = torch.full((2,), 0.5, dtype=torch.float64)
    gate = (torch.rand(2, 2, 24, dtype=torch.float64) < 0.4).double().requires_grad_()
    d_out = torch.randn_like(q)
    want, gap = _capped_gate_gradient(q, k, v, alpha, gate, d_out)
    assert (gap > 5).sum() > 20  # pruned keys far above their rows' kept ones
    kernels = [(metric_attention_eager, ()), (metric_attention_cpu, (None,)),
               (metric_attention_flex, (None,))]
    if metric_triton is not None:
        kernels.append((metric_triton.metric_attention_triton, (None,)))
    for fn, extra in kernels:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uncompiled flex_attention warns that it is slow
            out = fn(q, k, v, k.pow(2).sum(-1), alpha, gate, *extra)
        got = torch.autograd.grad(out, gate, d_out)[0]
        pruned = gate.detach() == 0
        torch.testing.assert_close(got[pruned], want[pruned], rtol=1e-10, atol=1e-10)
