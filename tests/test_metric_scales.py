"""Metric attention's scales: alpha (its default against SDPA's logit spread, learned or
fixed, logged in training) and the Mahalanobis weights, and both kept between calls
without autograd until the parameters change or an optimizer steps."""

from __future__ import annotations

import pytest
import torch

from moa.attention import ATTENTION
from moa.kernels.metric_reference import metric_scores
from moa.layers.auxiliary import AuxiliaryRecorder
from tests.conftest import (
    PositionedAttention,
    assert_same_outputs_and_gradients,
    forward_context,
    metric_heads_reference,
    metric_model_config,
    tiny_model_config,
)


@pytest.mark.parametrize(("metric", "key_norm"), [("l2", "ignore"), ("maha_diag", "ignore"),
                                                  ("maha_diag", "free"), ("maha_diag", "sphere"),
                                                  ("cosine", "ignore")])
@pytest.mark.parametrize("fold_alpha", [False, True])
def test_positioned_heads_fold_the_maps_into_one_projection(metric, key_norm, fold_alpha):
    """`positioned_heads` projects q, k and v in one product, folds the diagonal maps
    (sqrt(w); 2 alpha with fold_alpha) into its weight and bias and rotates q and k as one
    tensor: the same q, k and v as the q and kv projections apart with the maps and
    BlackHoleRoPE applied to their heads, in float64, and the same gradients of x and of
    every parameter (the encoding's too); GQA, with biases. Without autograd too."""
    torch.manual_seed(30)
    config = tiny_model_config({"name": "metric", "metric": {"name": metric},
                                "key_norm": key_norm, "n_kv_heads": 2, "bias": True},
                               position="blackhole_rope")
    attention = ATTENTION.build(config.attention, config).double()
    ctx = forward_context(config, 7)
    ctx.position.double()
    with torch.no_grad():
        for parameter in (*attention.parameters(), *ctx.position.parameters()):
            parameter.normal_()
    x = torch.randn(2, 7, config.d_model, dtype=torch.float64, requires_grad=True)
    q, k, v = metric_heads_reference(attention, x, ctx)
    if fold_alpha:
        q = q * 2 * attention.log_alpha.exp().view(-1, 1, 1)
    want = torch.cat([t.flatten() for t in (q, k, ctx.position.scale_values(v, ctx.positions))])
    got = torch.cat([t.flatten() for t in attention.positioned_heads(x, ctx, fold_alpha)])
    assert_same_outputs_and_gradients(
        got, want, [x, *attention.parameters(), *ctx.position.parameters()])
    with torch.no_grad():  # the inference path: the products apart, the maps on their outputs
        inferred = torch.cat([t.flatten() for t in attention.positioned_heads(x, ctx, fold_alpha)])
    torch.testing.assert_close(inferred, want)


@torch.no_grad()
def test_maha_scales_kept_between_steps_follow_the_inputs_dtype():
    """Without autograd the scales are kept between calls; float32 parameters with a
    float32 call, then a bfloat16 one (autocast), give each call scales in its own dtype."""
    torch.manual_seed(19)
    config = metric_model_config(metric={"name": "maha_diag"}, n_kv_heads=2)
    attention = ATTENTION.build(config.attention, config).eval()
    attention.log_maha.normal_()
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    wide = attention.to_metric_space(q, k)
    narrow = attention.to_metric_space(q.bfloat16(), k.bfloat16())
    for got, want in zip(narrow, wide, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)

@pytest.mark.parametrize("head_dim", [8, 16, 64, 128])
@pytest.mark.parametrize("key_norm", ["free", "sphere", "ignore"])
def test_default_alpha_gives_sdpa_logit_spread(head_dim, key_norm):
    """alpha_init: null is 1 / (2 sqrt(D)): on random q and k of unit variance per channel,
    the spread over keys of metric attention's scores is SDPA's (q.k / sqrt(D)) within
    sqrt(3/2) (the key-norm term's share) with free keys, and equal without that term."""
    torch.manual_seed(7)
    config = tiny_model_config({"name": "metric", "key_norm": key_norm, "alpha_init": None},
                               d_model=4 * head_dim, n_heads=4)
    attention = ATTENTION.build(config.attention, config).double()
    q = torch.randn(1, 4, 64, head_dim, dtype=torch.float64)
    k = torch.randn(1, 4, 4096, head_dim, dtype=torch.float64)
    q_m, k_m = attention.to_metric_space(q, k)
    k_norm = k_m.pow(2).sum(-1) * (key_norm != "ignore")
    metric = metric_scores(q_m, k_m, k_norm, attention.log_alpha.exp())
    sdpa = q @ k.transpose(-1, -2) / head_dim ** 0.5
    ratio = (metric.std(-1) / sdpa.std(-1)).mean().item()
    assert ratio == pytest.approx(1.5 ** 0.5 if key_norm == "free" else 1.0, rel=0.08)


def test_alpha_and_mahalanobis_spread_are_training_stats():
    torch.manual_seed(8)
    config = metric_model_config(metric={"name": "maha_diag"})
    attention = ATTENTION.build(config.attention, config)
    with torch.no_grad():
        attention.log_alpha.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]).log())
        attention.log_maha.normal_()
    record = AuxiliaryRecorder()
    attention.train()(torch.randn(2, 5, config.d_model), forward_context(config, 5, record))
    torch.testing.assert_close(record.stats["alpha"], torch.tensor(1.5))
    torch.testing.assert_close(record.stats["maha_log_spread"],
                               attention.log_maha.detach().std(correction=0))
    record = AuxiliaryRecorder()
    attention.eval()(torch.randn(2, 5, config.d_model), forward_context(config, 5, record))
    assert "alpha" not in record.stats  # decoding pays for no statistics


def test_kept_alpha_and_mahalanobis_scales_follow_the_parameters():
    """Without autograd alpha and sqrt(w) are kept between calls (a decoding step reuses
    them); a change of the parameters in place (an optimizer step) is seen at the next call,
    and a float64 copy of the module computes its own."""
    torch.manual_seed(9)
    config = metric_model_config("cpu_fused", metric={"name": "maha_diag"}, n_kv_heads=2)
    module = PositionedAttention(config).eval()
    x = torch.randn(2, 9, config.d_model)
    with torch.no_grad():
        before = module(x)
        torch.testing.assert_close(module(x), before, rtol=0, atol=0)
        module.attention.log_alpha.add_(0.3)
        module.attention.log_maha.normal_()
        moved = module(x)
    torch.testing.assert_close(moved, module(x))  # with autograd: computed, in one product
    assert not torch.allclose(moved, before)
    with torch.no_grad():
        wide = module.double()(x.double())
    torch.testing.assert_close(wide, moved.double(), rtol=1e-5, atol=1e-5)


def test_kept_values_follow_a_fused_optimizer_step():
    """A fused AdamW step (training's default) writes the parameters without bumping their
    version counters: the next call without autograd still computes alpha and sqrt(w)
    again, as one with autograd does."""
    torch.manual_seed(10)
    config = metric_model_config("cpu_fused", metric={"name": "maha_diag"})
    module = PositionedAttention(config).eval()
    x = torch.randn(2, 9, config.d_model)
    with torch.no_grad():
        module(x)  # keeps alpha and the scales
    for parameter in module.parameters():
        parameter.grad = torch.randn_like(parameter)
    torch.optim.AdamW(module.parameters(), lr=0.1, fused=True).step()
    with torch.no_grad():
        stepped = module(x)
    torch.testing.assert_close(stepped, module(x))  # with autograd: computed, in one product

@pytest.mark.parametrize("learn_alpha", [True, False])
def test_alpha_init_is_alpha_learned_or_fixed(learn_alpha):
    """alpha_init sets every head's alpha; with learn_alpha: false it is a buffer, saved with
    the module and left out of the optimizer's parameters, and the outputs are the same."""
    torch.manual_seed(29)
    config = metric_model_config("cpu_fused", alpha_init=0.7, learn_alpha=learn_alpha)
    attention = ATTENTION.build(config.attention, config)
    torch.testing.assert_close(attention.log_alpha, torch.full((4,), 0.7).log())
    assert ("log_alpha" in dict(attention.named_parameters())) == learn_alpha
    assert "log_alpha" in attention.state_dict()
    learned = ATTENTION.build(metric_model_config("cpu_fused", alpha_init=0.7).attention, config)
    learned.load_state_dict(attention.state_dict())
    x = torch.randn(2, 5, config.d_model)
    ctx = forward_context(config, 5)
    torch.testing.assert_close(attention(x, ctx), learned(x, ctx))
