"""Routers: weights, top-k selection, stats that sum to one, gates, recorded losses."""

from __future__ import annotations

import math

import pytest
import torch

from moa.errors import ConfigError
from moa.layers import balance
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.router import ROUTER, FeatureGates, RouterConfig
from moa.schema import parse

D, N = 16, 4


def build(**fields):
    """A router in training mode, the mode that records its losses and stats."""
    config = parse(RouterConfig, fields, "router")
    return ROUTER.build(config, D, N)


def route(router, x):
    record = AuxiliaryRecorder()
    return router(x, record), record


@pytest.mark.parametrize("kind", ["static", "softmax", "topk"])
def test_weights_and_usage_sum_to_one(kind):
    torch.manual_seed(0)
    routing, record = route(build(name=kind, router_hidden=8), torch.randn(3, 7, D))
    assert routing.weights.shape == (3, 7, N)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(3, 7))
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(3, 7))
    usage = sum(record.stats[f"usage.{i}"] for i in range(N))
    assert usage.item() == pytest.approx(1.0)
    routed = sum(record.stats[f"routed.{i}"] for i in range(N))
    assert routed.item() == pytest.approx({"topk": 2, "softmax": N, "static": N}[kind])
    entropy = record.stats["entropy"].item()
    assert 0.0 < entropy <= math.log(N) + 1e-6
    if kind == "static":
        assert entropy == pytest.approx(math.log(N))


def test_topk_keeps_the_k_most_probable_paths_renormalised():
    torch.manual_seed(1)
    routing, _ = route(build(name="topk", router_topk=2), torch.randn(2, 9, D))
    assert (routing.chosen.sum(-1) == 2).all()
    assert ((routing.weights > 0) == routing.chosen).all()
    threshold = routing.probs.topk(2, dim=-1).values[..., -1:]
    assert (routing.chosen == (routing.probs >= threshold)).all()
    kept = routing.probs * routing.chosen
    torch.testing.assert_close(routing.weights, kept / kept.sum(-1, keepdim=True))


def test_temperature_divides_the_logits():
    torch.manual_seed(2)
    cold, hot = build(router_temperature=1.0), build(router_temperature=2.0)
    hot.load_state_dict(cold.state_dict())
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(route(hot, x)[0].logits, route(cold, x)[0].logits / 2)


def test_router_gates_start_as_no_change_and_learn():
    torch.manual_seed(3)
    plain, gated = build(router_hidden=8), build(router_hidden=8, enable_router_gates=True)
    gated.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(route(gated, x)[0].weights, route(plain, x)[0].weights)
    probs = route(gated, x)[0].probs
    grad, = torch.autograd.grad(probs[..., 0].sum(), gated.bias_gate)
    assert grad.abs().sum() > 0


def test_feature_gates_start_as_the_identity_and_are_film():
    torch.manual_seed(4)
    gates = FeatureGates(D, N)
    x, y = torch.randn(5, D), torch.randn(5, D)
    torch.testing.assert_close(gates(1, x, y), y)
    with torch.no_grad():
        gates.weight.normal_()
        gates.bias.normal_()
    film = x @ gates.weight[1] + gates.bias[1]
    torch.testing.assert_close(gates(1, x, y), y * (1 + film[:, :D]) + film[:, D:])


def test_balance_losses_are_recorded_with_their_weights():
    torch.manual_seed(5)
    router = build(name="topk", mse_uniform_weight=0.1, switch_weight=0.2, z_loss_weight=0.3)
    routing, record = route(router, torch.randn(2, 6, D))
    values = {name: value for name, (value, _) in record.losses.items()}
    assert {name: weight for name, (_, weight) in record.losses.items()} == \
        {"mse_uniform": 0.1, "switch": 0.2, "z_loss": 0.3}
    torch.testing.assert_close(values["mse_uniform"], balance.mse_uniform(routing.probs))
    torch.testing.assert_close(values["switch"], balance.switch(routing.probs, routing.chosen))
    torch.testing.assert_close(values["z_loss"], balance.z_loss(routing.logits))
    assert not route(build(name="topk"), torch.randn(2, 6, D))[1].losses


@pytest.mark.parametrize("kind", ["static", "softmax", "topk"])
def test_eval_mode_routes_the_same_and_records_nothing(kind):
    """Only training logs a router's losses and stats; a decoding step pays for none."""
    torch.manual_seed(7)
    router = build(name=kind, mse_uniform_weight=0.1 * (kind != "static"))
    x = torch.randn(2, 6, D)
    trained, training_record = route(router, x)
    evaluated, record = route(router.eval(), x)
    assert training_record.stats and not record.stats and not record.losses
    torch.testing.assert_close(evaluated.weights, trained.weights, rtol=0, atol=0)


def test_dense_routers_dispatch_to_their_argmax():
    torch.manual_seed(6)
    routing, _ = route(build(), torch.randn(2, 6, D))
    assert (routing.dispatch().argmax(-1) == routing.probs.argmax(-1)).all()
    assert (routing.dispatch().sum(-1) == 1).all()


@pytest.mark.parametrize(("fields", "key"), [
    ({"name": "dense"}, "router.name"),
    ({"router_temperature": 0.0}, "router.router_temperature"),
    ({"router_dropout": 1.0}, "router.router_dropout"),
    ({"router_hidden": 0}, "router.router_hidden"),
    ({"switch_weight": -1.0}, "router.switch_weight"),
    ({"name": "static", "mse_uniform_weight": 0.01}, "router.mse_uniform_weight"),
    ({"name": "static", "enable_router_gates": True}, "router.enable_router_gates"),
])
def test_bad_router_configs_name_their_key(fields, key):
    with pytest.raises(ConfigError) as error:
        RouterConfig(**fields)
    assert error.value.key == key


@pytest.mark.parametrize("kind", ["static", "softmax", "topk"])
def test_a_bfloat16_model_routes_in_float32(kind):
    """Weights, probabilities and usage stats in float32 whatever the model's dtype: the
    balance losses and usage stats of weights rounded to bfloat16's 8 bits would be skewed
    (the mixture casts the weights to each path's output dtype itself)."""
    torch.manual_seed(14)
    router = build(name=kind).to(torch.bfloat16)
    routing, record = route(router, torch.randn(2, 5, D, dtype=torch.bfloat16))
    assert routing.weights.dtype == routing.probs.dtype == torch.float32
    assert record.stats["usage.0"].dtype == torch.float32


def test_a_dense_routers_switch_loss_counts_a_path_no_token_prefers():
    """The switch loss n sum_i f_i P_i of a dense router: f_i the share of tokens whose most
    probable path is i, zero for a path that is never the most probable."""
    torch.manual_seed(15)
    router = build(name="softmax", switch_weight=1.0)
    with torch.no_grad():
        router.scores.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -30.0]))
    routing, record = route(router, torch.randn(2, 6, D))
    fraction = torch.nn.functional.one_hot(routing.probs.argmax(-1), N).float().mean((0, 1))
    assert fraction[-1] == 0
    expected = N * (fraction * routing.probs.mean((0, 1))).sum()
    torch.testing.assert_close(record.losses["switch"][0], expected)


@pytest.mark.parametrize(("fields", "message"), [
    ({"router_hidden": 0},
     "router.router_hidden=0; allowed: a positive integer, or null for a linear router"),
    ({"router_dropout": -0.1}, "router.router_dropout=-0.1; allowed: 0.0 <= router_dropout < 1.0"),
    ({"router_temperature": 0.0}, "router.router_temperature=0.0; allowed: a positive float"),
    ({"router_topk": 0}, "router.router_topk=0; allowed: a positive integer"),
    ({"z_loss_weight": -1.0}, "router.z_loss_weight=-1.0; allowed: >= 0"),
    ({"name": "static", "switch_weight": 0.01},
     "router.switch_weight=0.01 (a static router has nothing to balance); "
     "allowed: 0.0 with router=static"),
    ({"name": "static", "enable_router_gates": True},
     "router.enable_router_gates=True (a static router has no logits); "
     "allowed: false with router=static"),
])
def test_config_errors_give_the_key_the_value_and_what_is_allowed(fields, message):
    with pytest.raises(ConfigError) as error:
        RouterConfig(**fields)
    assert str(error.value) == f"invalid config {message}"


def test_the_smallest_router_sizes_are_allowed():
    """One hidden unit and one path per token are valid routers."""
    torch.manual_seed(16)
    router = build(name="topk", router_hidden=1, router_topk=1)
    routing, _ = route(router, torch.randn(2, 5, D))
    assert (routing.chosen.sum(-1) == 1).all()
    torch.testing.assert_close(routing.weights, routing.chosen.float())


def test_router_gates_add_a_linear_bias_to_the_logits():
    """logits = scores(x) + x @ W, W (C, n) the router-bias gate, here nonzero; in float32."""
    torch.manual_seed(17)
    router = build(enable_router_gates=True).double()
    with torch.no_grad():
        router.bias_gate.normal_()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    want = router.scores(x) + x @ router.bias_gate
    torch.testing.assert_close(router.logits(x), want.float())
