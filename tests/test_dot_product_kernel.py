"""`dot_product_attention` (moa/kernels/dot_product.py) against the softmax written out in
float64: one query per head grouped by key head, and every other call as PyTorch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa.kernels import dot_product
from moa.kernels.dot_product import dot_product_attention


def written_out(q, k, v, mask, scale):
    """softmax(q k^T scale, masked) v, each query head over its key head (head h // group)."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = scale * q @ k.transpose(-1, -2)  # (B, Hq, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def record_query_heads(monkeypatch) -> list[int]:
    """The head count of the queries each call of PyTorch's kernel gets."""
    heads, kernel = [], F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        heads.append(q.size(1))
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(dot_product.F, "scaled_dot_product_attention", recording)
    return heads


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("n_q", "n_kv"), [(6, 1), (6, 2), (4, 4)])
def test_one_query_per_head_equals_the_softmax_written_out(monkeypatch, n_q, n_kv, masked):
    torch.manual_seed(n_q + n_kv + masked)
    B, S, D = 3, 23, 5
    q = torch.randn(B, n_q, 1, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, n_kv, S, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, n_kv, S, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, 1, 1, S) < 0.7 if masked else None  # a key mask (padding)
    if mask is not None:
        mask[..., 0] = True  # every query keeps a key
    heads = record_query_heads(monkeypatch)
    out = dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert heads == [n_kv if n_kv < n_q else n_q]  # grouped rows under GQA and MQA
    expected = written_out(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("case", ["causal", "many queries", "mask per head"])
def test_other_calls_go_to_pytorch_ungrouped(monkeypatch, case):
    """is_causal (PyTorch's mask is top-left aligned, at one query too), several queries, a
    mask that differs between query heads."""
    torch.manual_seed(7)
    B, n_q, n_kv, S, D = 2, 4, 2, 9, 8
    T = 9 if case == "many queries" else 1
    q = torch.randn(B, n_q, T, D, dtype=torch.float64)
    k, v = torch.randn(2, B, n_kv, S, D, dtype=torch.float64)
    mask = None
    if case == "mask per head":
        mask = torch.rand(B, n_q, T, S) < 0.7
        mask[..., 0] = True
    heads = record_query_heads(monkeypatch)
    out = dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    assert heads == [n_q]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool).tril()
    torch.testing.assert_close(out, written_out(q, k, v, mask, D ** -0.5))
