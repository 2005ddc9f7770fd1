"""Every attention scheme: shapes, causality, and the GQA/MHA equivalence."""

from __future__ import annotations

import pytest
import torch

from moa.attention import ATTENTION
from moa.models.language_model import build_model
from tests.conftest import (
    assert_causal,
    assert_dropout_in_training_only,
    forward_context,
    tiny_model_config,
)

SCHEMES = {  # the head layouts of conf/attention/{mha,gqa,mqa,sqa}.yaml on 4 model heads
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "sqa": {"n_q_heads": 2, "n_kv_heads": 2},
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_attention_shape_and_causality(scheme):
    torch.manual_seed(0)
    config = tiny_model_config(SCHEMES[scheme])
    assert_causal(ATTENTION.build(config.attention, config).eval(), config)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_model_logits_are_causal(scheme):
    torch.manual_seed(1)
    model = build_model(tiny_model_config(SCHEMES[scheme])).eval()
    ids = torch.randint(0, 50, (2, 20))
    changed = ids.clone()
    changed[:, 11] = (changed[:, 11] + 1) % 50
    before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(after[:, :11], before[:, :11])
    assert not torch.allclose(after[:, 11:], before[:, 11:])


# model.head_dim=12 on d_model 32 and 4 heads: the heads are 48 wide together, not 32
WIDE_HEADS = {**SCHEMES, "metric": {"name": "metric", "impl": "cpu_fused", "n_kv_heads": 2,
                                    "use_balls": True},
              "alcca": {"name": "alcca", "k": 4}}


@pytest.mark.parametrize("scheme", WIDE_HEADS)
def test_head_dim_sets_each_heads_width(scheme):
    torch.manual_seed(2)
    config = tiny_model_config(WIDE_HEADS[scheme], head_dim=12)
    attention = ATTENTION.build(config.attention, config).eval()
    n_q, n_kv = config.attention.layout(config)
    heads = attention.heads
    assert (heads.q.weight.shape, heads.kv.weight.shape, heads.out.weight.shape) == \
        ((n_q * 12, 32), (2 * n_kv * 12, 32), (32, n_q * 12))
    q, k, v = heads.split(torch.randn(2, 5, 32))
    assert (q.shape, k.shape, v.shape) == ((2, n_q, 5, 12), (2, n_kv, 5, 12), (2, n_kv, 5, 12))
    assert_causal(attention, config)


def test_gqa_with_all_kv_heads_equals_mha():
    """GQA with n_kv_heads == n_heads is MHA: same weights, same outputs and gradients."""
    torch.manual_seed(2)
    mha_config = tiny_model_config({})
    gqa_config = tiny_model_config({"n_kv_heads": 4})
    mha = ATTENTION.build(mha_config.attention, mha_config)
    gqa = ATTENTION.build(gqa_config.attention, gqa_config)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(3, 9, 32, requires_grad=True)
    out_mha = mha(x, forward_context(mha_config, 9))
    out_gqa = gqa(x, forward_context(gqa_config, 9))
    torch.testing.assert_close(out_gqa, out_mha)
    grad_mha, = torch.autograd.grad(out_mha.square().sum(), x)
    grad_gqa, = torch.autograd.grad(out_gqa.square().sum(), x)
    torch.testing.assert_close(grad_gqa, grad_mha)


def test_grouped_heads_share_keys_like_repeated_mha():
    """GQA equals MHA whose K/V heads are the GQA heads repeated per group."""
    torch.manual_seed(3)
    gqa_config = tiny_model_config({"n_kv_heads": 2})
    mha_config = tiny_model_config({})
    gqa = ATTENTION.build(gqa_config.attention, gqa_config)
    mha = ATTENTION.build(mha_config.attention, mha_config)
    hd, d = gqa_config.head_dim, gqa_config.d_model
    k_w, v_w = gqa.heads.kv.weight.view(2, 2, hd, d)  # (k|v, Hkv, D, C)
    repeated = torch.stack((k_w.repeat_interleave(2, 0), v_w.repeat_interleave(2, 0)))
    state = gqa.state_dict()
    state["heads.kv.weight"] = repeated.reshape(-1, d)
    mha.load_state_dict(state)
    x = torch.randn(2, 7, d)
    torch.testing.assert_close(gqa(x, forward_context(gqa_config, 7)),
                               mha(x, forward_context(mha_config, 7)))


def test_sqa_uses_fewer_query_heads():
    config = tiny_model_config(SCHEMES["sqa"])
    attention = ATTENTION.build(config.attention, config)
    assert attention.heads.q.out_features == 2 * config.head_dim
    assert attention.heads.out.in_features == 2 * config.head_dim


def _reads(scheme: dict, memory: bool, T: int = 7, M: int = 5):
    """A scheme in float64, its input (2, T, C), a context that sees every key (an
    encoder's, or with `memory` a read of a (2, M, C) memory) with a key mask."""
    from dataclasses import replace

    config = tiny_model_config(scheme)
    torch.manual_seed(0)
    module = ATTENTION.build(config.attention, config).double()
    x = torch.randn(2, T, config.d_model, dtype=torch.float64)
    S = M if memory else T
    key_mask = torch.ones(2, S, dtype=torch.bool)
    key_mask[1, S - 2:] = False
    source = torch.randn(2, M, config.d_model, dtype=torch.float64) if memory else None
    ctx = replace(forward_context(config, T), causal=False, key_mask=key_mask, memory=source)
    return module, x, ctx


@pytest.mark.parametrize("memory", [False, True])
def test_dot_product_without_causal_mask_equals_the_softmax_written_out(memory):
    """Bidirectional self-attention (rotated q and k) and a memory read (only q rotated, the
    memory's keys without positions), masked keys dropped, against the formula."""
    module, x, ctx = _reads({"name": "dot_product", "n_q_heads": 4, "n_kv_heads": 2}, memory)
    heads = module.heads
    q = heads.queries(x)
    k, v = heads.keys_values(x if ctx.memory is None else ctx.memory)
    if memory:
        q = ctx.position.rotate_queries(q, ctx.positions)
    else:
        q, k = ctx.position.rotate(q, k, ctx.positions)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    probs = scores.masked_fill(~ctx.key_mask[:, None, None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(module(x, ctx), heads.merge(probs @ v))
    changed = x.clone()
    changed[:, -1] += 1.0  # a later query changes earlier outputs only where keys are its own
    moved = (module(changed, ctx)[:, 0] - module(x, ctx)[:, 0]).abs().max()
    assert (moved > 1e-6) != memory


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("metric", ["l2", "cosine", "maha_diag"])
def test_metric_without_causal_mask_fused_equals_eager(metric, memory):
    """Metric attention's bidirectional path through SDPA equals its eager reference,
    forward and the parameters' gradients; with a cache the memory is projected once."""
    scheme = {"name": "metric", "n_kv_heads": 2, "metric": {"name": metric}}
    fused, x, ctx = _reads({**scheme, "impl": "cpu_fused"}, memory)
    eager, _, _ = _reads({**scheme, "impl": "eager"}, memory)
    eager.load_state_dict(fused.state_dict())
    out, reference = fused(x, ctx), eager(x, ctx)
    torch.testing.assert_close(out, reference)
    grads = torch.autograd.grad(out.square().sum(), list(fused.parameters()))
    expected = torch.autograd.grad(reference.square().sum(), list(eager.parameters()))
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want)
    if memory:
        from dataclasses import replace

        from moa.layers.kv_cache import LayerCache

        cache = LayerCache(16)
        first = fused(x, replace(ctx, cache=cache))
        later = fused(x, replace(ctx, cache=cache, memory=torch.zeros_like(ctx.memory)))
        torch.testing.assert_close(first, later)  # the cached projection, not the new memory


def test_a_ball_with_a_fixed_radius_saves_it_and_learns_only_its_origin():
    """`learn_radius: false`: the radius is a buffer, saved and loaded with the weights but no
    parameter; the gate keeps exactly the keys within it, and only the origin learns."""
    from moa.attention.balls import BallPruning

    def ball(radius):
        return BallPruning(2, 8, radius_init=radius, learn_radius=False, origin_init_scale=0.3,
                           band=0.5)

    fixed = ball(1.5)
    assert [name for name, _ in fixed.named_parameters()] == ["origin"]
    assert set(fixed.state_dict()) == {"origin", "log_radius"}
    loaded = ball(9.0)
    loaded.load_state_dict(fixed.state_dict())
    torch.testing.assert_close(loaded.radius, torch.full((2,), 1.5))
    k = torch.randn(3, 2, 7, 8) * 0.6
    gate, _ = loaded(k)
    distance = (k - fixed.origin[None, :, None].detach()).norm(dim=-1)  # (B, H, S)
    assert torch.equal(gate.detach(), (distance <= 1.5).float())
    assert 0 < gate.detach().mean() < 1
    origin_grad, = torch.autograd.grad((gate * torch.randn_like(gate)).sum(), loaded.origin)
    assert origin_grad.abs().sum() > 0


def test_a_balls_band_is_the_keys_near_its_sphere():
    """The band (the keys whose gate gradient the fused kernels compute, skipping the rest)
    is exactly the keys within band * r / 2 of the sphere, inside or out: the keys deep
    inside or far outside have a flat surrogate, so no gate gradient to compute."""
    from moa.attention.balls import BallPruning

    ball = BallPruning(1, 2, radius_init=2.0, learn_radius=True, origin_init_scale=0.0, band=0.5)
    distances = torch.tensor([0.2, 1.0, 1.49, 1.51, 1.9, 2.49, 2.51, 4.0])  # sphere at 2 +- 0.5
    k = torch.stack([distances, torch.zeros_like(distances)], dim=-1)[None, None]  # (1,1,8,2)
    k.requires_grad_()
    verdict = ball(k)
    gate, band = verdict
    assert band[0, 0].tolist() == [False, False, False, True, True, True, False, False]
    assert gate[0, 0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert verdict.pruned_fraction().item() == 3 / 8
    grad, = torch.autograd.grad(gate.sum(), k)
    assert torch.equal(grad[0, 0, :, 0] != 0, band[0, 0])  # the slope is the band's


@pytest.mark.parametrize(("attention", "message"), [
    ({"n_q_heads": 0}, "attention.n_q_heads=0; allowed: a positive integer or null"),
    ({"n_kv_heads": -1}, "attention.n_kv_heads=-1; allowed: a positive integer or null"),
    ({"dropout": 1.0}, "attention.dropout=1.0; allowed: 0.0 <= dropout < 1.0"),
    ({"n_q_heads": 8}, "attention.n_q_heads=8 (more query heads than the model has); "
                       "allowed: 1..4 (model.n_heads)"),
    ({"n_kv_heads": 3}, "attention.n_kv_heads=3 (n_q_heads must be divisible by n_kv_heads); "
                        "allowed: divisors of n_q_heads=4: [1, 2, 4]"),
])
def test_head_layout_errors_give_the_key_the_value_and_what_is_allowed(attention, message):
    """On a model of 4 heads; the limits themselves (4 query heads over 1 key head, no
    dropout) pass."""
    from moa.errors import ConfigError

    assert tiny_model_config({"n_q_heads": 4, "n_kv_heads": 1, "dropout": 0.0}).attention.layout(
        tiny_model_config()) == (4, 1)
    with pytest.raises(ConfigError) as error:
        tiny_model_config(attention)
    assert str(error.value) == f"invalid config {message}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("q_len", "k_len"), [(1, 1), (1, 5), (2, 2), (2, 5), (3, 3), (4, 6)])
def test_attention_mask_is_the_visibility_written_out(q_len, k_len, causal, padded):
    """What (mask, is_causal) lets each query see, as the kernel applies it (is_causal is
    its top-left triangle), is the causal rule over the last q_len positions and the key
    mask, by loops: two queries are causal too, and a key mask keeps the triangle."""
    from moa.kernels.masks import attention_mask

    torch.manual_seed(40)
    key_mask = torch.rand(2, k_len) > 0.4 if padded else None
    mask, is_causal = attention_mask(q_len, k_len, torch.device("cpu"), causal, key_mask)
    seen = torch.ones(2, q_len, k_len, dtype=torch.bool)
    if mask is not None:
        seen &= mask.expand(2, 1, q_len, k_len)[:, 0]
    if is_causal:
        seen &= torch.ones(q_len, k_len, dtype=torch.bool).tril()
    expected = torch.tensor([[[(not causal or j <= k_len - q_len + i)
                               and (key_mask is None or bool(key_mask[b, j]))
                               for j in range(k_len)] for i in range(q_len)] for b in range(2)])
    assert torch.equal(seen, expected)


@pytest.mark.parametrize("bias", [True, False])
def test_the_projections_carry_a_bias_when_configured(bias):
    config = tiny_model_config({"n_kv_heads": 2, "bias": bias})
    heads = ATTENTION.build(config.attention, config).heads
    assert [layer.bias is not None for layer in (heads.q, heads.kv, heads.out)] == [bias] * 3


@pytest.mark.parametrize("memory", [False, True])
def test_dot_product_outputs_at_output_positions_are_the_full_outputs_there(memory):
    """Queries rotated at their own positions and values gated at theirs (blackhole_rope,
    its gate perturbed), or queries reading a memory: the outputs at ctx.output_positions
    (B, K) are the full ones."""
    torch.manual_seed(41)
    config = tiny_model_config({"n_kv_heads": 2}, position="blackhole_rope")
    attention = ATTENTION.build(config.attention, config).double().eval()
    ctx = forward_context(config, 7)
    ctx.position.double()
    with torch.no_grad():
        ctx.position.energy_coefficients.normal_()
    x = torch.randn(2, 7, config.d_model, dtype=torch.float64)
    if memory:
        ctx = ctx.replace(causal=False, memory=torch.randn(2, 4, config.d_model,
                                                           dtype=torch.float64))
    wanted = torch.tensor([[6, 0, 3], [2, 5, 5]])  # (B, K)
    with torch.no_grad():
        full = attention(x, ctx)
        some = attention(x, ctx.replace(output_positions=wanted))
    torch.testing.assert_close(some, torch.stack([full[b, wanted[b]] for b in range(2)]))


def test_dot_product_drops_probabilities_in_training_only():
    torch.manual_seed(42)
    config = tiny_model_config({"dropout": 0.5})
    assert_dropout_in_training_only(
        ATTENTION.build(config.attention, config).double(),
        ATTENTION.build(tiny_model_config().attention, config).double(),
        torch.randn(2, 7, config.d_model, dtype=torch.float64), forward_context(config, 7))
