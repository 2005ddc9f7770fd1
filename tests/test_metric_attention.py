"""Metric attention as a module: metrics, causality, KV cache, the score forms, the fused
path against the eager one, output positions, dropout, training. Its ball pruning:
test_metric_balls.py; its bidirectional (encoder) path: test_metric_encoder.py; alpha and
the Mahalanobis scales: test_metric_scales.py; its configuration: test_metric_config.py."""

from __future__ import annotations

import pytest
import torch

import moa.attention.metric as metric_module
from moa.attention import ATTENTION
from moa.attention.metric import dot_product_form
from moa.kernels.metric_reference import metric_attention_eager, metric_scores
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.regularizers import triangle_inequality_penalty
from moa.models.language_model import build_model
from tests.conftest import (
    PositionedAttention,
    assert_dropout_in_training_only,
    forward_context,
    metric_heads_reference,
    metric_model_config,
    pruned_fractions,
    radii_keeping,
    tiny_model_config,
)


def test_scores_are_negative_scaled_squared_distances():
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    alpha = torch.rand(4, dtype=torch.float64) + 0.1
    direct = (q[:, :, :, None] - k.repeat_interleave(2, 1)[:, :, None]).pow(2).sum(-1)
    scores = metric_scores(q, k, k.pow(2).sum(-1), alpha)
    torch.testing.assert_close(scores, -alpha.view(1, 4, 1, 1) * direct)


def test_maha_diag_is_weighted_squared_distance():
    torch.manual_seed(0)
    config = metric_model_config(metric={"name": "maha_diag", "maha_init": 0.5}, n_kv_heads=2)
    attention = ATTENTION.build(config.attention, config)
    with torch.no_grad():
        attention.log_maha.normal_()
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    q_m, k_m = attention.to_metric_space(q, k)
    weight = attention.log_maha.exp()  # (Hkv, D)
    for h in range(4):
        g = h // 2
        want = (weight[g] * (q[0, h, :, None] - k[0, g, None]).pow(2)).sum(-1)
        got = (q_m[0, h, :, None] - k_m[0, g, None]).pow(2).sum(-1)
        torch.testing.assert_close(got, want)


def test_cosine_distance_uses_unit_vectors():
    config = metric_model_config(metric={"name": "cosine"})
    attention = ATTENTION.build(config.attention, config)
    q_m, k_m = attention.to_metric_space(torch.randn(1, 4, 3, 8) * 5, torch.randn(1, 4, 3, 8))
    torch.testing.assert_close(q_m.norm(dim=-1), torch.ones(1, 4, 3))
    torch.testing.assert_close(k_m.norm(dim=-1), torch.ones(1, 4, 3))


@pytest.mark.parametrize("metric", ["l2", "cosine", "maha_diag"])
@pytest.mark.parametrize("impl", ["eager", "cpu_fused"])
@pytest.mark.parametrize("balls", [False, True])
def test_metric_attention_is_causal(metric, impl, balls):
    """New inputs after position 6 change no output at positions <= 6 and do change later
    ones. With balls, the radii prune a measured share of keys strictly between 0 and 1, so
    the causal mask, not the gate, is what hides the future (a radius that prunes every key
    leaves each query its own key only: such a test passes without any causal mask)."""
    torch.manual_seed(1)
    config = metric_model_config(impl, metric={"name": metric}, n_kv_heads=2, use_balls=balls,
                            alpha_init=0.5)
    module = PositionedAttention(config).eval()
    x = torch.randn(2, 13, config.d_model)
    if balls:
        radii_keeping(module, x, 0.5)
        record = AuxiliaryRecorder()
        with torch.no_grad():
            module.attention(x, forward_context(config, 13, record))
        assert 0.3 < float(record.stats["pruned_fraction"]) < 0.7
    with torch.no_grad():
        y = module(x)
        x2 = x.clone()
        x2[:, 7:] = torch.randn_like(x2[:, 7:])
        y2 = module(x2)
    torch.testing.assert_close(y2[:, :7], y[:, :7])
    assert not torch.allclose(y2[:, 7:], y[:, 7:])


@pytest.mark.parametrize("impl", ["eager", "cpu_fused"])
@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("balls, key_norm",
                         [(False, "free"), (True, "free"), (True, "sphere"), (False, "ignore"),
                          (True, "ignore")])
def test_cached_decoding_equals_uncached(impl, position, balls, key_norm):
    """A prefix, then one token at a time, equals one full forward. With balls, each layer's
    radii prune a share of the keys strictly between 0 and 1 (asserted), so a cache that
    gated its keys or kept each query's own key at the wrong position would differ."""
    torch.manual_seed(2)
    config = tiny_model_config({"name": "metric", "impl": impl, "n_kv_heads": 2,
                                "metric": {"name": "maha_diag"}, "use_balls": balls,
                                "alpha_init": 0.5, "key_norm": key_norm}, position=position)
    model = build_model(config).eval()
    ids = torch.randint(0, 50, (2, 12))
    if balls:
        radii_keeping(model, ids, 0.5)
        fractions = pruned_fractions(model, ids)
        assert len(fractions) == config.n_layers and all(0.3 < f < 0.7 for f in fractions)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :5], cache).logits]  # a prefix, then one token at a time
        steps += [model(ids[:, t:t + 1], cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    held = cache.layers[0].compact("kept_keys") if balls else cache.layers[0]
    kept_norms = {"k_norm"} if key_norm != "ignore" else set()  # ignore: zeros, never cached
    assert set(held.buffers) == {"k", "v"} | kept_norms


def test_gpt_with_maha_diag_metric_attention_learns():
    """A smoke-sized GPT with metric attention (maha_diag, balls, TI) fits a fixed batch."""
    torch.manual_seed(5)
    config = metric_model_config("auto", metric={"name": "maha_diag"}, use_balls=True,
                            radius_init=2.0, ti_reg_weight=0.01)
    model = build_model(config).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 50, (4, 33))
    losses = []
    for _ in range(30):
        output = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), ids[:, 1:].flatten())
        (loss + output.aux_loss).backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model.blocks[0].attention.log_maha.grad is None  # zeroed: it was trained


@pytest.mark.parametrize("metric", ["l2", "maha_diag"])
def test_sphere_keys_are_dot_product_attention_over_unit_keys(metric):
    """key_norm=sphere puts the metric-space keys on the sphere of radius sqrt(D), so that
    ||k||^2 is the same for every key and softmax(-alpha ||q - k||^2) is SDPA's softmax of
    2 alpha q.k: the scores keep no term that ranks a key without the query."""
    torch.manual_seed(6)
    config = metric_model_config(metric={"name": metric}, key_norm="sphere", n_kv_heads=2)
    attention = ATTENTION.build(config.attention, config).double()
    with torch.no_grad():
        if attention.log_maha is not None:
            attention.log_maha.normal_()
        attention.log_alpha.normal_()
    q, k, v = (torch.randn(2, heads, 9, 8, dtype=torch.float64) for heads in (4, 2, 2))
    q_m, k_m = attention.to_metric_space(q, k)
    radius = torch.full((2, 2, 9), 8 ** 0.5, dtype=torch.float64)
    torch.testing.assert_close(k_m.norm(dim=-1), radius)
    alpha = attention.log_alpha.exp()
    got = metric_attention_eager(q_m, k_m, v, k_m.pow(2).sum(-1), alpha, None)
    want = torch.nn.functional.scaled_dot_product_attention(
        q_m * 2 * alpha.view(1, 4, 1, 1), k_m.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        is_causal=True, scale=1.0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", ["eager", "cpu_fused"])
@pytest.mark.parametrize("metric", ["l2", "maha_diag"])
def test_ignoring_the_key_norm_is_dot_product_attention(impl, metric):
    """key_norm=ignore drops -alpha ||k||^2, the one term by which metric attention's softmax
    differs from dot-product attention: the module is then SDPA over its metric-space q and
    k with scale 2 alpha, through every kernel."""
    torch.manual_seed(9)
    config = metric_model_config(impl, metric={"name": metric}, key_norm="ignore", n_kv_heads=2)
    attention = ATTENTION.build(config.attention, config).eval()
    with torch.no_grad():
        if attention.log_maha is not None:
            attention.log_maha.normal_()
        attention.log_alpha.normal_()
    x = torch.randn(2, 11, config.d_model)
    ctx = forward_context(config, 11)
    q, k, v = metric_heads_reference(attention, x, ctx)
    alpha = attention.log_alpha.exp().view(1, -1, 1, 1)
    want = attention.heads.merge(torch.nn.functional.scaled_dot_product_attention(
        q * 2 * alpha, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
        scale=1.0))
    with torch.no_grad():
        torch.testing.assert_close(attention(x, ctx), want, rtol=1e-4, atol=1e-5)


# (2, 4): T = Hkv and S = Hq, so GQA is told by the head counts, not by T or S
@pytest.mark.parametrize("T, S", [(1, 1), (17, 17), (5, 13), (1, 9), (2, 4)])
def test_dot_product_form_equals_the_reference_without_key_scores(T, S):
    """key_norm=ignore without balls runs `dot_product_form` on CPU: the reference with zero
    key norms, in float64, forward and every gradient; GQA, queries the last T of S keys."""
    torch.manual_seed(10)
    wide = dict(dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 4, T, 8, **wide)
    k, v = torch.randn(2, 2, S, 8, **wide), torch.randn(2, 2, S, 8, **wide)
    alpha = (torch.rand(4, dtype=torch.float64) + 0.2).requires_grad_()
    k_norm = torch.zeros(2, 2, S, dtype=torch.float64)
    got = dot_product_form(q, k, v, k_norm, alpha, None)
    want = metric_attention_eager(q, k, v, k_norm, alpha, None)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for mine, reference in zip(torch.autograd.grad(got, (q, k, v, alpha), grad),
                               torch.autograd.grad(want, (q, k, v, alpha), grad), strict=True):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize("key_norm", ["free", "sphere", "ignore"])
@pytest.mark.parametrize("balls", [False, True])
def test_fused_module_equals_the_eager_module(key_norm, balls):
    """impl=cpu_fused against impl=eager on the same weights, float64, forward and every
    gradient: whichever kernel the module picks for the key scores and the gate (the
    augmented fused heads, or PyTorch's dot-product attention when there are neither), the
    key norms reach it. With balls, the radii keep about half of the keys."""
    torch.manual_seed(20)
    eager_config = metric_model_config("eager", n_kv_heads=2, key_norm=key_norm, use_balls=balls,
                                  alpha_init=0.5)
    fused_config = metric_model_config("cpu_fused", n_kv_heads=2, key_norm=key_norm,
                                  use_balls=balls, alpha_init=0.5)
    eager = PositionedAttention(eager_config).double().train()
    fused = PositionedAttention(fused_config).double().train()
    x = torch.randn(2, 11, eager_config.d_model, dtype=torch.float64, requires_grad=True)
    if balls:
        radii_keeping(eager, x.detach(), 0.5)
    fused.load_state_dict(eager.state_dict())
    want, got = eager(x), fused(x)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    names = [name for name, p in eager.named_parameters() if p.requires_grad]
    mine = torch.autograd.grad(got, [x] + [fused.get_parameter(n) for n in names], grad)
    reference = torch.autograd.grad(want, [x] + [eager.get_parameter(n) for n in names], grad)
    for name, a, b in zip(["x", *names], mine, reference, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("weight", "training", "recorded"),
                         [(0.5, True, True), (0.0, True, False), (0.5, False, False)])
def test_causal_ti_penalty_only_in_training_with_a_positive_weight(weight, training, recorded,
                                                                   monkeypatch):
    """The triangle-inequality penalty of the causal path, with every query and with none (a
    path no token chose): recorded with its weight when training with a positive weight,
    and then over the same points either way (every query is still projected), those of
    the reference kernel's module (the CPU kernel folds no 2 alpha into them)."""
    torch.manual_seed(21)
    config = metric_model_config("cpu_fused", n_kv_heads=2, ti_reg_weight=weight,
                            ti_reg_samples=32)
    attention = ATTENTION.build(config.attention, config).double().train(training)
    with torch.no_grad():
        attention.log_alpha.normal_()
    x = torch.randn(2, 6, config.d_model, dtype=torch.float64)
    penalties = []
    for wanted in (None, torch.zeros(2, 0, dtype=torch.long)):
        record = AuxiliaryRecorder()
        torch.manual_seed(22)  # the penalty's random triples
        attention(x, forward_context(config, 6, record).replace(output_positions=wanted))
        assert ("ti_penalty" in record.losses) == recorded
        if recorded:
            value, given = record.losses["ti_penalty"]
            assert given == weight and value.requires_grad
            penalties.append(value)
    if recorded:
        torch.testing.assert_close(penalties[1], penalties[0], rtol=0, atol=0)
        points = []
        monkeypatch.setattr(metric_module, "triangle_inequality_penalty",
                            lambda p, n: points.append(p) or triangle_inequality_penalty(p, n))
        eager = metric_model_config("eager", n_kv_heads=2, ti_reg_weight=weight)
        for kind in (attention, ATTENTION.build(eager.attention, config).double().train()):
            kind.load_state_dict(attention.state_dict())
            kind(x, forward_context(config, 6))
        torch.testing.assert_close(points[0], points[1], rtol=0, atol=0)


@pytest.mark.parametrize(("weight", "training", "projected"),
                         [(0.0, False, False), (0.5, False, False), (0.0, True, False),
                          (0.5, True, True)])
def test_a_step_with_no_query_projects_only_keys_and_values(weight, training, projected):
    """output_positions of width 0 (a decoding step of a path no token chose: the mixture
    calls it only to extend its cache): -> (B, 0, C), and no query is projected unless the
    triangle-inequality penalty needs them (training with a positive weight)."""
    torch.manual_seed(23)
    config = metric_model_config("cpu_fused", n_kv_heads=2, ti_reg_weight=weight)
    attention = ATTENTION.build(config.attention, config).train(training)
    calls = []
    for name in ("queries", "stacked"):  # the two that project queries
        project = getattr(attention.heads, name)
        setattr(attention.heads, name,
                lambda *a, project=project, **k: calls.append(1) or project(*a, **k))
    x = torch.randn(2, 3, config.d_model)  # B != T
    ctx = forward_context(config, 3).replace(output_positions=torch.zeros(2, 0,
                                                                    dtype=torch.long))
    y = attention(x, ctx)
    assert y.shape == (2, 0, config.d_model)
    assert bool(calls) == projected


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("balls", [False, True])
def test_causal_outputs_at_output_positions_are_the_full_outputs_there(K, balls):
    """With ctx.output_positions (B, K) only those queries attend, as in a full forward:
    one position per row (a last-token loss) as well as several, float64."""
    torch.manual_seed(24)
    config = metric_model_config("cpu_fused", n_kv_heads=2, key_norm="free", use_balls=balls,
                            alpha_init=0.5)
    module = PositionedAttention(config).double().eval()
    x = torch.randn(2, 7, config.d_model, dtype=torch.float64)
    if balls:
        radii_keeping(module, x, 0.5)
    wanted = torch.tensor([[6, 0, 3], [2, 5, 5]])[:, :K]  # (B, K)
    with torch.no_grad():
        full = module(x)
        some = module.attention(x, forward_context(config, 7).replace(output_positions=wanted))
    torch.testing.assert_close(some, torch.stack([full[b, wanted[b]] for b in range(2)]))


@pytest.mark.parametrize("encoder", [False, True])
def test_attention_drops_probabilities_in_training_only(encoder):
    """Causal and bidirectional paths against the fused path, which has no dropout."""
    torch.manual_seed(25)
    config = metric_model_config("eager", attn_drop=0.5)
    x = torch.randn(2, 7, config.d_model, dtype=torch.float64)
    assert_dropout_in_training_only(
        ATTENTION.build(config.attention, config).double(),
        ATTENTION.build(metric_model_config("cpu_fused").attention, config).double(), x,
        forward_context(config, 7).replace(causal=not encoder))


@pytest.mark.parametrize("key_norm", ["free", "ignore"])
def test_key_norms_are_summed_in_at_least_float32(key_norm):
    """||k||^2 of bfloat16 keys in float32 (the cache keeps them so: a bfloat16 sum of D
    squares keeps 8 bits), of float64 keys in float64; zeros of those dtypes when ignored."""
    torch.manual_seed(26)
    config = metric_model_config(key_norm=key_norm)
    attention = ATTENTION.build(config.attention, config)
    k = (torch.randn(2, 4, 5, 64) * 3).bfloat16()
    want = k.double().pow(2).sum(-1) * (key_norm == "free")
    for keys, dtype in ((k, torch.float32), (k.double(), torch.float64)):
        norms = attention._key_norms(keys)
        assert norms.dtype == dtype
        torch.testing.assert_close(norms.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("K", [None, 3])
def test_causal_dropout_is_the_references_with_the_gate_and_at_output_positions(K):
    """Training with attn_drop and balls (about half the keys pruned), every query or K at
    ctx.output_positions: the reference fed by hand, under the same random seed, drops the
    same probabilities of the gated attention."""
    torch.manual_seed(27)
    config = metric_model_config("eager", n_kv_heads=2, key_norm="free", use_balls=True,
                            alpha_init=0.5, attn_drop=0.5)
    module = PositionedAttention(config).double().train()
    x = torch.randn(2, 9, config.d_model, dtype=torch.float64)
    radii_keeping(module, x, 0.5)
    attention, ctx = module.attention, forward_context(config, 9)
    wanted = None if K is None else torch.tensor([[8, 0, 4], [3, 3, 7]])
    q, k, v = metric_heads_reference(attention, x, ctx)
    gate = attention.balls(k).gate
    if wanted is not None:
        q = torch.stack([q[b, :, wanted[b]] for b in range(2)])  # (B, Hq, K, D)
    torch.manual_seed(28)
    expected = metric_attention_eager(q, k, v, k.pow(2).sum(-1), attention.log_alpha.exp(), gate,
                                      dropout=0.5, query_positions=wanted)
    torch.manual_seed(28)
    got = attention(x, ctx.replace(output_positions=wanted))
    torch.testing.assert_close(got, attention.heads.merge(expected))
