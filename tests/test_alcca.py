"""ALCCA: the module against the brute-force reference, metric attention, the centre-of-
mass branch, causality, cached decoding and a smoke train (its retrofit of a trained model:
test_retrofit.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moa.attention import ATTENTION
from moa.attention import alcca as alcca_module
from moa.attention.metric import MetricConfig
from moa.errors import ConfigError
from moa.kernels.alcca_reference import alcca_attention_eager, alcca_probabilities
from moa.layers.context import at_output_positions
from moa.models.language_model import build_model
from moa.models.retrofit import swap_attention, transfer_weights
from tests.conftest import (
    assert_causal,
    forward_context,
    metric_heads_reference,
    tiny_model_config,
)


def _alcca_config(position="rope", **attention):
    return tiny_model_config({"name": "alcca", **attention}, position=position)


def _reference_forward(attention, x, ctx):
    """The module's projections and metric map around the brute-force reference."""
    q, k, v = metric_heads_reference(attention, x, ctx)
    c = attention.alcca
    y = alcca_attention_eager(q, k, v, attention.log_alpha.exp(), c.k, c.theta, c.eps,
                              c.weighting, c.key_norm)
    return attention.heads.merge(y)


def _centre_distances(attention, x, ctx):
    """Each query's distance to the mean of the keys up to it: (B, Hq, T)."""
    q, k, _ = metric_heads_reference(attention, x, ctx)
    centre = k.cumsum(2) / torch.arange(1, k.size(2) + 1, dtype=k.dtype)[:, None]
    return (q - centre.repeat_interleave(attention.group, 1)).norm(dim=-1)


def _between_halves(distances):
    """A theta halfway between the two middle distances, so that about half the queries
    take the centre-of-mass branch and none sits on theta, where the module's and the
    reference's roundings could send it to different branches."""
    ordered = distances.detach().flatten().sort().values
    middle = ordered.numel() // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def _median_centre_distance(attention, x, ctx):
    """A theta that sends about half the queries to the centre-of-mass branch."""
    return _between_halves(_centre_distances(attention, x, ctx))


@pytest.mark.parametrize("T", [1, 17, 113])
@pytest.mark.parametrize("top_k", [1, 4, 200])
@pytest.mark.parametrize(("weighting", "key_norm"), [("softmax", "free"),
                                                      ("inverse_distance", "free"),
                                                      ("softmax", "ignore"),
                                                      ("inverse_distance", "ignore")])
def test_forward_and_gradients_match_the_reference(T, top_k, weighting, key_norm):
    torch.manual_seed(T * 7 + top_k)
    config = tiny_model_config({"name": "alcca", "k": top_k, "weighting": weighting,
                                "key_norm": key_norm, "n_kv_heads": 2, "block": 32,
                                "metric": {"name": "maha_diag"},
                                "index_options": {"block": 16}}, max_seq_len=128)
    attention = ATTENTION.build(config.attention, config).double()
    with torch.no_grad():
        attention.log_alpha.uniform_(-2.0, 0.0)
        attention.log_maha.normal_(0.0, 0.3)
    x = torch.randn(2, T, config.d_model, dtype=torch.float64)
    ctx = forward_context(config, T)
    attention.alcca.theta = _median_centre_distance(attention, x, ctx) if T > 1 else 0.0
    weights = torch.randn(2, T, config.d_model, dtype=torch.float64)

    def value_and_grads(forward):
        x_ = x.clone().requires_grad_()
        y = forward(attention, x_, ctx)
        params = [x_, *attention.parameters()]
        grads = torch.autograd.grad((y * weights).sum(), params, allow_unused=True)
        return y, [torch.zeros_like(p) if g is None else g
                   for p, g in zip(params, grads, strict=True)]

    got, got_grads = value_and_grads(lambda a, x_, c: a(x_, c))
    want, want_grads = value_and_grads(_reference_forward)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("inner_product", [False, True])
def test_dense_softmax_average_equals_the_gathered_one(inner_product):
    """The two ways of averaging neighbours agree in float64, forward and gradients, with
    padded (-1) neighbour slots; the module picks the dense one for softmax where S <= k * D."""
    torch.manual_seed(3)
    N, M, S, D, k = 3, 9, 12, 4, 5
    queries, keys, values = (torch.randn(N, n, D, dtype=torch.float64, requires_grad=True)
                             for n in (M, S, S))
    alpha = (torch.rand(N, M, dtype=torch.float64) + 0.5).requires_grad_()
    ids = torch.stack([torch.stack([torch.randperm(S)[:k] for _ in range(M)])
                       for _ in range(N)])  # (N, M, k), distinct keys per query
    ids[:, :3, 2:] = -1  # the first queries see fewer than k keys
    inputs = (queries, keys, values, alpha)
    weights = torch.randn(N, M, D, dtype=torch.float64)

    def value_and_grads(y):
        return y, torch.autograd.grad((y * weights).sum(), inputs)

    got, got_grads = value_and_grads(alcca_module._dense_softmax_average(
        queries, keys, values, ids, alpha, inner_product))
    want, want_grads = value_and_grads(alcca_module._gathered_average(
        queries, keys, values, ids, alpha, "softmax", 1e-6, inner_product))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("weighting", ["softmax", "inverse_distance"])
def test_reference_weights_sit_on_the_nearest_visible_keys(weighting):
    """Each row of the reference's weights sums to 1 over min(k, visible) keys, all visible,
    and those are the nearest: no unchosen visible key is closer than a chosen one."""
    torch.manual_seed(1)
    top_k, T = 5, 13
    q = torch.randn(2, 4, T, 8, dtype=torch.float64)  # (B, Hq, T, D)
    k = torch.randn(2, 2, T, 8, dtype=torch.float64)  # (B, Hkv, T, D)
    weights = alcca_probabilities(q, k, torch.rand(4, dtype=torch.float64) + 0.5, top_k,
                                  0.0, 1e-6, weighting)  # (B, Hq, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, T, dtype=torch.float64))
    chosen = weights > 0
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    assert not (chosen & ~visible).any()
    assert chosen.sum(-1).equal(visible.sum(-1).clamp(max=top_k).expand(2, 4, T))
    distance = torch.cdist(q, k.repeat_interleave(2, dim=1))  # (B, Hq, T, T)
    farthest_chosen = distance.masked_fill(~chosen, -1.0).amax(-1)
    nearest_left = distance.masked_fill(chosen | ~visible, float("inf")).amin(-1)
    assert (farthest_chosen <= nearest_left).all()


@pytest.mark.parametrize("key_norm", ["free", "ignore"])
def test_all_neighbours_and_softmax_equal_metric_attention(key_norm):
    """k >= L, theta = 0, softmax weighting: ALCCA is metric attention, with the weights of
    a metric model loaded unchanged, under either key-norm rule."""
    torch.manual_seed(0)
    metric_config = tiny_model_config({"name": "metric", "impl": "eager", "n_kv_heads": 2,
                                       "key_norm": key_norm, "metric": {"name": "maha_diag"}})
    metric = build_model(metric_config).eval()
    config = swap_attention(metric_config, {"name": "alcca", "k": 64, "theta": 0.0,
                                            "weighting": "softmax"})
    alcca = build_model(config).eval()
    report = transfer_weights(alcca, metric.state_dict())
    assert report.missing == [] and report.unexpected == []
    ids = torch.randint(0, 50, (2, 41))
    with torch.no_grad():
        torch.testing.assert_close(alcca(ids).logits, metric(ids).logits)


@pytest.mark.parametrize("index", ["exact", "faiss_flat"])
def test_alcca_is_causal(index):
    if index != "exact":
        pytest.importorskip("faiss")
    torch.manual_seed(1)
    config = _alcca_config(k=3, index=index, theta=0.4, n_kv_heads=2,
                           index_options={"chunk": 4})
    assert_causal(ATTENTION.build(config.attention, config).eval(), config)


def test_centre_of_mass_branch_is_the_running_mean_of_values():
    """theta beyond every distance: each output is the mean of the values so far, and the
    queries and keys get no gradient (only the values do)."""
    torch.manual_seed(2)
    config = _alcca_config(theta=1e6, position="learned")
    attention = ATTENTION.build(config.attention, config)
    x = torch.randn(2, 19, config.d_model)
    ctx = forward_context(config, 19)
    y = attention(x, ctx)
    assert float(ctx.record.stats["centre_fraction"]) == 1.0
    _, _, v = attention.heads.split(x)  # (B, H, T, D)
    mean = v.cumsum(2) / torch.arange(1, 20)[:, None]
    torch.testing.assert_close(y, attention.heads.merge(mean))
    y.sum().backward()
    assert attention.heads.q.weight.grad is None or not attention.heads.q.weight.grad.any()
    kv_grad = attention.heads.kv.weight.grad.view(2, -1, config.d_model)
    assert not kv_grad[0].any() and kv_grad[1].any()  # keys none, values some


def _thetas_at_median_distance(model: torch.nn.Module, ids: torch.Tensor, decoded: int) -> None:
    """Give each layer, first to last, a theta at the median distance of its decoded queries
    (positions >= `decoded`) from their centres on `ids`: about half take each branch."""
    for block in model.blocks:
        attention = block.attention
        seen = []
        handle = attention.register_forward_pre_hook(lambda _, a, seen=seen: seen.append(a))
        with torch.no_grad():
            model(ids)
        handle.remove()
        x, ctx = seen[0]
        with torch.no_grad():
            theta = _between_halves(_centre_distances(attention, x, ctx)[:, :, decoded:])
        attention.alcca = dataclasses.replace(attention.alcca, theta=theta)


@pytest.mark.parametrize("index", ["exact", "faiss_flat", "faiss_ivf"])
def test_cached_decoding_equals_uncached(index):
    """A prefix, then one token at a time, through the growing index and running sums. Each
    layer's theta sends 30-70% of the decoded queries to the centre-of-mass branch
    (asserted), so the neighbour search over the growing index, an IVF index trained
    part-way through decoding included, decides the rest."""
    if index != "exact":
        pytest.importorskip("faiss")
    torch.manual_seed(3)
    config = _alcca_config(k=4, index=index, n_kv_heads=2,
                           index_options={"chunk": 5, "block": 4, "nlist": 1, "nprobe": 1})
    model = build_model(config).eval()  # faiss_ivf trains on the first 39 keys, mid-decode
    ids = torch.randint(0, 50, (2, 48))
    _thetas_at_median_distance(model, ids, decoded=20)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :20], cache)]
        steps += [model(ids[:, t:t + 1], cache) for t in range(20, 48)]
    torch.testing.assert_close(torch.cat([s.logits for s in steps], dim=1), full, rtol=1e-5,
                               atol=1e-5)
    for layer in range(config.n_layers):
        name = f"layers.{layer}.attention.centre_fraction"
        decoded = torch.stack([s.stats[name] for s in steps[1:]]).mean()
        assert 0.3 < float(decoded) < 0.7, (name, float(decoded))


@pytest.mark.parametrize("index", ["exact", "faiss_flat", "faiss_ivf"])
def test_inner_product_neighbours_are_causal_and_cache_as_uncached(index):
    """key_norm=ignore: the keys of largest q.k, through every index, a prefix then one token
    at a time (faiss_ivf trains on the first 39 keys, mid-decode)."""
    if index != "exact":
        pytest.importorskip("faiss")
    torch.manual_seed(4)
    config = _alcca_config(k=4, index=index, key_norm="ignore", n_kv_heads=2,
                           index_options={"chunk": 5, "block": 4, "nlist": 1, "nprobe": 1})
    assert_causal(ATTENTION.build(config.attention, config).eval(), config)
    model = build_model(config).eval()
    ids = torch.randint(0, 50, (2, 48))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :20], cache).logits]
        steps += [model(ids[:, t:t + 1], cache).logits for t in range(20, 48)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_config_errors_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="attention.weighting"):
        _alcca_config(weighting="uniform")
    with pytest.raises(ConfigError, match="attention.k"):
        _alcca_config(k=0)
    monkeypatch.setattr(alcca_module, "faiss_available", lambda: False)
    with pytest.raises(ConfigError, match="attention.index.*faiss is not installed"):
        _alcca_config(index="faiss_hnsw")


def test_smoke_train_with_alcca(compose_config):
    from moa.training import train

    cfg = compose_config("trainer=smoke", "model=gpt", "attention=alcca", "attention.k=8",
                         "tokenizer=byte", "trainer.max_steps=12", "trainer.val_check_interval=6")
    metrics, objects = train(cfg)
    assert objects["module"].model_config.attention.name == "alcca"
    assert math.isfinite(metrics["val_loss"])
    assert metrics["val_loss"] < math.log(objects["module"].model_config.vocab_size)


@pytest.mark.parametrize("weighting", ["softmax", "inverse_distance"])
def test_reference_of_the_last_queries_is_the_full_references_last_rows(weighting):
    """Queries at the last T of S positions (a cached decoding step): each row is the row of
    the same query in the full (S x S) reference, both branches (theta between them)."""
    torch.manual_seed(2)
    S, T = 15, 4
    q = torch.randn(2, 4, S, 8, dtype=torch.float64)
    k = torch.randn(2, 2, S, 8, dtype=torch.float64)
    alpha = torch.rand(4, dtype=torch.float64) + 0.5
    full = alcca_probabilities(q, k, alpha, 3, 3.5, 1e-6, weighting)  # (B, Hq, S, S)
    near = (full > 0).sum(-1) > 3  # rows of the centre-of-mass branch
    assert near[..., -T:].any() and not near[..., -T:].all()
    last = alcca_probabilities(q[:, :, -T:], k, alpha, 3, 3.5, 1e-6, weighting)
    torch.testing.assert_close(last, full[:, :, -T:])


def test_inverse_distance_weights_are_the_cards_rule():
    """w_i = (1 / (d_i + eps)) / sum_j 1 / (d_j + eps) over the valid neighbours, 0 at the
    others; eps large enough to matter."""
    from moa.kernels.alcca_reference import neighbour_weights

    torch.manual_seed(3)
    distance_sq = torch.rand(2, 3, 5, dtype=torch.float64) * 4  # (B, H, k)
    valid = torch.rand(2, 3, 5) > 0.3
    valid[..., 0] = True
    weights = neighbour_weights(distance_sq, torch.ones(2, 3, dtype=torch.float64),
                                "inverse_distance", 0.5, valid)
    raw = torch.where(valid, 1.0 / (distance_sq.sqrt() + 0.5), 0.0)
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True))


def test_values_are_gated_at_their_positions():
    """ALCCA with blackhole_rope's value gate perturbed: the reference fed the gated values."""
    torch.manual_seed(4)
    config = tiny_model_config({"name": "alcca", "k": 3, "n_kv_heads": 2},
                               position="blackhole_rope")
    attention = ATTENTION.build(config.attention, config).double()
    x = torch.randn(2, 9, config.d_model, dtype=torch.float64)
    ctx = forward_context(config, 9)
    ctx.position.double()
    with torch.no_grad():
        ctx.position.energy_coefficients.normal_()
        attention.alcca.theta = _median_centre_distance(attention, x, ctx)
    q, k, v = metric_heads_reference(attention, x, ctx)
    v = v * ctx.position.energy_gate(ctx.positions)  # (B, Hkv, T, D) * (T, D)
    c = attention.alcca
    want = alcca_attention_eager(q, k, v, attention.log_alpha.exp(), c.k, c.theta, c.eps,
                                 c.weighting, c.key_norm)
    torch.testing.assert_close(attention(x, ctx), attention.heads.merge(want))


@pytest.mark.parametrize("index", ["exact", "faiss_flat"])
def test_outputs_at_output_positions_are_the_full_outputs_there(index):
    """Only the positions asked for (a decoding step's last token, a loss on some tokens),
    both branches (theta between them): each is the full forward's output there. The index
    adds keys 4 at a time, so the full forward searches in several chunks. A FAISS index,
    searched in position order only, runs the full forward and keeps those rows (as the
    blocks ask any module: `at_output_positions`)."""
    if index != "exact":
        pytest.importorskip("faiss")
    torch.manual_seed(5)
    config = _alcca_config(k=3, n_kv_heads=2, index=index, index_options={"block": 4})
    attention = ATTENTION.build(config.attention, config).double()
    x = torch.randn(2, 11, config.d_model, dtype=torch.float64)
    with torch.no_grad():
        attention.alcca.theta = _median_centre_distance(attention, x, forward_context(config, 11))
    wanted = torch.tensor([[10, 3, 6, 0], [1, 1, 9, 5]])  # (B, K)
    full = attention(x, forward_context(config, 11))
    some = at_output_positions(attention, x, dataclasses.replace(forward_context(config, 11),
                                                                 output_positions=wanted))
    torch.testing.assert_close(some, torch.stack([full[b, wanted[b]] for b in range(2)]))


@pytest.mark.parametrize(("fields", "message"), [
    ({"dropout": 0.1}, "attention.dropout=0.1; allowed: 0.0 (ALCCA has no dropout)"),
    ({"k": 0}, "attention.k=0; allowed: a positive integer"),
    ({"theta": -1.0}, "attention.theta=-1.0; allowed: >= 0"),
    ({"eps": 0.0}, "attention.eps=0.0; allowed: a positive float"),
    ({"block": 0}, "attention.block=0; allowed: a positive integer"),
    ({"index": "annoy"},
     "attention.index='annoy'; allowed: exact | faiss_flat | faiss_ivf | faiss_hnsw")])
def test_config_errors_give_the_key_the_value_and_what_is_allowed(fields, message):
    with pytest.raises(ConfigError) as error:
        _alcca_config(**fields)
    assert str(error.value) == f"invalid config {message}"


def test_without_faiss_only_the_exact_index_is_allowed(monkeypatch):
    """The smallest values pass (a block of one query, k of 1); a FAISS index without FAISS
    is refused with the reason and the way out, the exact one is not."""
    monkeypatch.setattr(alcca_module, "faiss_available", lambda: False)
    assert _alcca_config(index="exact", block=1, k=1).attention.block == 1
    with pytest.raises(ConfigError) as error:
        _alcca_config(index="faiss_hnsw")
    assert str(error.value) == (
        "invalid config attention.index='faiss_hnsw' (faiss is not installed); "
        "allowed: exact, or install faiss (pip install 'moa[faiss]')")


def test_the_metric_attention_it_shares_takes_every_shared_field():
    """ALCCA's parameters are metric attention's, built from these fields: each one set
    away from its default reaches the metric-attention config."""
    config = alcca_module.AlccaConfig(n_q_heads=4, n_kv_heads=2, bias=True,
                                      metric=MetricConfig(name="maha_diag"), alpha_init=0.3,
                                      learn_alpha=False, key_norm="free")
    shared = config.metric_attention()
    assert (shared.n_q_heads, shared.n_kv_heads, shared.bias, shared.metric.name,
            shared.alpha_init, shared.learn_alpha, shared.key_norm, shared.impl) == (
        4, 2, True, "maha_diag", 0.3, False, "free", "eager")
