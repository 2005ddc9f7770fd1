"""The routed mixture: causality, sparse == dense, its own caches, stats, presets."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from moa.attention import ATTENTION
from moa.errors import ConfigError
from moa.layers import router as router_module
from moa.layers.activation import GELU
from moa.layers.auxiliary import AuxiliaryRecorder, statistics_recorded
from moa.models.language_model import build_model
from moa.training import train
from moa.training.run_config import parse_run
from tests.conftest import (
    assert_cached_matches_full,
    assert_causal,
    assert_same_outputs_and_gradients,
    forward_context,
    tiny_model_config,
)

MOA_PATHS = [  # the MoA cards' four paths, with dot-product stand-ins for the metric ones
    {"name": "local_conv", "conv_kernel": 3},
    {"name": "dot_product"},
    {"name": "channel_mix", "mixer_hidden": 48},
    {"name": "dot_product", "n_kv_heads": 1},
]


def mixture_config(router: dict, paths: list[dict] = MOA_PATHS, **model):
    return tiny_model_config({"name": "mixture", "paths": paths, "router": router}, **model)


ROUTERS = {
    "static": {"name": "static"},
    "softmax": {"name": "softmax", "router_hidden": 16},
    "topk": {"name": "topk", "router_topk": 2, "enable_feature_gates": True,
             "enable_router_gates": True},
}


@pytest.mark.parametrize("router", ROUTERS)
def test_mixture_is_causal(router):
    torch.manual_seed(0)
    config = mixture_config(ROUTERS[router])
    assert_causal(ATTENTION.build(config.attention, config).eval(), config, T=11, t=5)


def dense_reference(mixture, x, ctx):
    """sum_i w_i gate_i(path_i(x)), every path on every token, unrouted weights zero."""
    routing = mixture.router(x, AuxiliaryRecorder())
    out = torch.zeros_like(x)
    for i, path in enumerate(mixture.paths):
        out = out + routing.weights[..., i:i + 1] * mixture.gate(i, x, path(x, ctx))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_execution_equals_dense_with_unrouted_weights_zeroed(k):
    torch.manual_seed(1)
    config = mixture_config({"name": "topk", "router_topk": k, "enable_feature_gates": True})
    mixture = ATTENTION.build(config.attention, config).eval()
    with torch.no_grad():
        mixture.feature_gates.weight.normal_(std=0.1)  # gates away from the identity
    x = torch.randn(2, 10, config.d_model, requires_grad=True)
    rows_seen = []
    mixture.paths[2].up.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    sparse = mixture(x, forward_context(config, 10))
    routed = mixture.router(x, AuxiliaryRecorder()).chosen[..., 2].sum().item()
    assert rows_seen == [routed]  # channel mix ran on its routed tokens only
    dense = dense_reference(mixture, x, forward_context(config, 10))
    assert_same_outputs_and_gradients(sparse, dense, [x, *mixture.parameters()])


def test_under_torch_compile_the_routed_sum_is_one_graph_equal_to_the_sparse_sum():
    """A compiled top-k mixture reads no routing on the host: dynamo traces it whole, and
    its dense sum's outputs and gradients are the eager sparse sum's."""
    torch._dynamo.reset()
    torch.manual_seed(6)
    config = mixture_config(ROUTERS["topk"])
    mixture = ATTENTION.build(config.attention, config).eval()
    with torch.no_grad():
        mixture.feature_gates.weight.normal_(std=0.1)
    x = torch.randn(2, 10, config.d_model, requires_grad=True)
    explanation = torch._dynamo.explain(mixture)(x, forward_context(config, 10))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
        explanation.break_reasons
    compiled = torch.compile(mixture, backend="aot_eager", fullgraph=True)
    assert_same_outputs_and_gradients(compiled(x, forward_context(config, 10)),
                                      mixture(x, forward_context(config, 10)),
                                      [x, *mixture.parameters()])


def test_a_path_no_token_chose_is_not_computed():
    torch.manual_seed(2)
    config = mixture_config({"name": "topk", "router_topk": 2})
    mixture = ATTENTION.build(config.attention, config).eval()
    with torch.no_grad():  # route every token to paths 0 and 2
        mixture.router.scores.bias.copy_(torch.tensor([20.0, -20.0, 20.0, -20.0]))
    calls = []
    for i in (1, 3):
        mixture.paths[i].register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    x = torch.randn(2, 7, config.d_model)
    y = mixture(x, forward_context(config, 7))
    assert calls == []
    torch.testing.assert_close(y, dense_reference(mixture, x, forward_context(config, 7)))


@pytest.mark.parametrize("router", ROUTERS)
def test_cached_generation_equals_uncached(router):
    torch.manual_seed(3)
    model = build_model(mixture_config(ROUTERS[router])).eval()
    assert_cached_matches_full(model, torch.randint(0, 50, (2, 12)))


def test_each_path_keeps_its_own_cache():
    torch.manual_seed(4)
    model = build_model(mixture_config(ROUTERS["softmax"])).eval()
    cache = model.new_cache()
    model(torch.randint(0, 50, (1, 5)), cache)
    layer = cache.layers[0]
    assert layer.buffers == {}
    assert layer.state["paths.0"].state["conv"].shape == (1, 2, 32)  # the last K - 1 inputs
    assert layer.state["paths.1"].buffers["k"].size(1) == 4  # MHA: 4 key heads
    assert layer.state["paths.3"].buffers["k"].size(1) == 1  # MQA: 1 key head
    assert layer.state["paths.1"].lengths["k"] == 5


def test_model_records_router_stats_per_layer_and_path():
    torch.manual_seed(5)
    router = {**ROUTERS["topk"], "mse_uniform_weight": 0.01, "switch_weight": 0.01,
              "z_loss_weight": 0.001}
    output = build_model(mixture_config(router))(torch.randint(0, 50, (2, 9)))
    for layer in range(2):
        prefix = f"layers.{layer}.attention.router."
        usage = sum(output.stats[f"{prefix}usage.{i}"] for i in range(4))
        assert usage.item() == pytest.approx(1.0)
        assert 0 < output.stats[f"{prefix}entropy"].item() <= math.log(4)
        assert {f"{prefix}{name}" for name in ("mse_uniform", "switch", "z_loss")} <= \
            set(output.aux_losses)
    total = sum(weight * value for value, weight in output.aux_losses.values())
    torch.testing.assert_close(output.aux_loss, total)


def test_a_step_without_stats_has_the_same_losses_and_output():
    """Under statistics_recorded(False) (a training step whose logs nobody writes) the model
    records no stats, and its logits and auxiliary losses are those of a recorded step."""
    torch.manual_seed(7)
    router = {**ROUTERS["topk"], "mse_uniform_weight": 0.01, "z_loss_weight": 0.001}
    paths = [MOA_PATHS[0], {"name": "metric", "metric": {"name": "maha_diag"}}, *MOA_PATHS[2:]]
    model = build_model(mixture_config(router, paths=paths))
    ids = torch.randint(0, 50, (2, 9))
    recorded = model(ids)
    with statistics_recorded(False):
        unrecorded = model(ids)
    assert AuxiliaryRecorder().wants_stats  # the context put it back
    view = AuxiliaryRecorder(wants_stats=False).scoped("layers.0")  # a view wants as its
    view.stat("alpha", 1.0)  # recorder does, wherever it is made
    assert not view.wants_stats and view.stats == {}
    assert unrecorded.stats == {} and {"layers.0.attention.paths.1.alpha",
                                       "layers.0.attention.router.entropy"} <= set(recorded.stats)
    torch.testing.assert_close(unrecorded.logits, recorded.logits, rtol=0, atol=0)
    assert unrecorded.aux_losses.keys() == recorded.aux_losses.keys()
    torch.testing.assert_close(unrecorded.aux_loss, recorded.aux_loss, rtol=0, atol=0)


def test_moas_has_mha_gqa_and_mqa_paths_of_the_same_size():
    config = mixture_config({"name": "softmax", "router_hidden": 8}, paths=[
        {"name": "dot_product"}, {"name": "dot_product", "n_kv_heads": 2},
        {"name": "dot_product", "n_kv_heads": 1}])
    mixture = ATTENTION.build(config.attention, config)
    assert [path.heads.n_kv_heads for path in mixture.paths] == [4, 2, 1]
    assert {path.heads.q.out_features for path in mixture.paths} == {config.d_model}
    assert isinstance(mixture.router.scores[1], GELU)  # the 2-layer GELU router


@pytest.mark.parametrize(("attention", "key"), [
    ({"paths": [{"name": "dot_product"}]}, "attention.paths"),
    ({"paths": [{"name": "dot_product"}, {"name": "nope"}]}, "attention.paths.1.name"),
    ({"paths": [{"name": "dot_product"}, {"name": "dot_product", "n_kv_heads": 3}]},
     "attention.paths.1.n_kv_heads"),
    ({"paths": MOA_PATHS[:2], "router": {"name": "topk", "router_topk": 3}},
     "attention.router.router_topk"),
    ({"paths": MOA_PATHS[:2], "router": {"router_temperature": -1.0}},
     "attention.router.router_temperature"),
])
def test_bad_mixture_configs_name_their_key(attention, key):
    with pytest.raises(ConfigError) as error:
        tiny_model_config({"name": "mixture", **attention})
    assert error.value.key == key


def test_balance_regularizers_compose_as_a_list(compose_config):
    spec = parse_run(compose_config("model=moas", "router=topk", "regularizer=[switch,z_loss]"))
    router = spec.model.attention.router
    assert (router.name, router.mse_uniform_weight, router.switch_weight) == ("topk", 0.0, 0.01)
    assert router.z_loss_weight > 0
    static = parse_run(compose_config("model=moas_static")).model.attention.router
    assert static.name == "static"


@pytest.mark.parametrize("preset", ["moas", "moas_static"])
def test_preset_smoke_train_saves_router_stats(compose_config, tmp_path, preset, monkeypatch):
    """Every logged step has the router's stats, and only the logged steps compute them
    (3 of 6 at log_every_n_steps=2; the FLOP count's forward on the meta device aside)."""
    devices = []
    record_usage = router_module.record_usage

    def counted(routing, record) -> None:
        devices.append(routing.weights.device.type)
        record_usage(routing, record)
    monkeypatch.setattr(router_module, "record_usage", counted)
    cfg = compose_config("trainer=smoke", f"model={preset}", "trainer.max_steps=6",
                         "trainer.log_every_n_steps=2", "evaluate=false", "tokenizer=byte",
                         "model.n_layers=1")
    _, objects = train(cfg)
    assert objects["module"].model_config.attention.name == "mixture"
    assert devices.count("cpu") == 3  # one router
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert rows and all(math.isfinite(float(row["train/loss"])) for row in rows)
    stats = "train/stats/layers.0.attention.router."
    for row in rows:
        assert sum(float(row[f"{stats}usage.{i}"]) for i in range(3)) == pytest.approx(1.0)
    assert ("train/aux/layers.0.attention.router.mse_uniform" in rows[0]) == (preset == "moas")


def test_mixture_config_round_trips_through_a_plain_dict():
    config = mixture_config(ROUTERS["topk"])
    again = type(config).from_dict(config.to_dict())
    assert again == config
    model = build_model(config)
    build_model(again).load_state_dict(model.state_dict())


def test_metric_paths_plug_in_by_config():
    """The MoA cards' paths: local conv, metric MHA, channel mix, metric MQA, top-2."""
    torch.manual_seed(6)
    paths = [MOA_PATHS[0], {"name": "metric", "metric": {"name": "maha_diag"}},
             MOA_PATHS[2], {"name": "metric", "n_kv_heads": 1}]
    model = build_model(mixture_config({"name": "topk", "enable_feature_gates": True},
                                       paths=paths)).eval()
    assert_cached_matches_full(model, torch.randint(0, 50, (2, 12)))


def test_a_decoding_step_extends_the_cache_of_a_path_no_token_chose():
    """Batch 1, top-2 of 4: each decoding step leaves two paths unchosen. An unchosen metric
    path only extends its cache (no output projection), and the logits equal the full
    forward's, so the keys it cached are the ones later steps need."""
    torch.manual_seed(7)
    paths = [MOA_PATHS[0], {"name": "metric", "metric": {"name": "maha_diag"}},
             MOA_PATHS[2], {"name": "metric", "n_kv_heads": 1}]
    model = build_model(mixture_config({"name": "topk"}, paths=paths)).eval()
    projected = []
    for block in model.blocks:
        for i in (1, 3):
            block.attention.paths[i].heads.out.register_forward_hook(
                lambda m, inp, out: projected.append(inp[0].size(1)))
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        assert_cached_matches_full(model, ids)
    decoded = [n for n in projected if n == 1]  # the steps' projections, one token each
    assert len(decoded) < 2 * len(model.blocks) * (12 - 3)  # some step skipped a path
    cache = model.new_cache()
    with torch.no_grad():
        for t in range(12):
            model(ids[:, t:t + 1], cache)
    assert all(layer.state[f"paths.{i}"].lengths["k"] == 12
               for layer in cache.layers for i in (1, 3))


def test_top_k_routed_preset_trains_with_the_throughput_callback(compose_config, tmp_path):
    """Top-k routing is data-dependent (no FLOP count on the meta device): tokens/s is
    still logged and training runs."""
    cfg = compose_config("trainer=smoke", "model=moas", "router=topk", "trainer.max_steps=12",
                         "trainer.log_every_n_steps=1", "evaluate=false", "tokenizer=byte",
                         "model.n_layers=1")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 12
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("train|device|items_per_sec") for row in rows)


@pytest.mark.parametrize("router", ROUTERS)
def test_outputs_at_output_positions_are_the_full_outputs_there(router):
    """Only the positions asked for (a decoding step's last token, a loss on some tokens):
    each is the full forward's output there, mixed by its own token's routing."""
    from dataclasses import replace

    torch.manual_seed(13)
    config = mixture_config(ROUTERS[router])
    mixture = ATTENTION.build(config.attention, config).double().eval()
    x = torch.randn(2, 9, config.d_model, dtype=torch.float64)
    wanted = torch.tensor([[8, 2, 5], [0, 0, 7]])  # (B, K)
    full = mixture(x, forward_context(config, 9))
    some = mixture(x, replace(forward_context(config, 9), output_positions=wanted))
    torch.testing.assert_close(some, torch.stack([full[b, wanted[b]] for b in range(2)]))


@pytest.mark.parametrize(("attention", "message"), [
    ({"paths": [{"name": "dot_product"}]},
     "attention.paths=[{'name': 'dot_product'}]; allowed: a list of two or more attention "
     "configs"),
    ({"paths": MOA_PATHS[:2], "router": {"name": "topk", "router_topk": 3}},
     "attention.router.router_topk=3; allowed: 1..2 (the number of paths)"),
    ({"paths": [MOA_PATHS[0], {"name": "dot_product", "n_kv_heads": 3}]},
     "attention.paths.1.n_kv_heads=3 (n_q_heads must be divisible by n_kv_heads); "
     "allowed: divisors of n_q_heads=4: [1, 2, 4]"),
])
def test_config_errors_give_the_key_the_value_and_what_is_allowed(attention, message):
    """A path's own error keeps its value, allowed values and reason under its index, also
    behind a path with nothing to check against the model (local_conv)."""
    with pytest.raises(ConfigError) as error:
        tiny_model_config({"name": "mixture", **attention})
    assert str(error.value) == f"invalid config {message}"


def test_top_k_may_keep_every_path():
    torch.manual_seed(18)
    config = mixture_config({"name": "topk", "router_topk": 2}, paths=MOA_PATHS[:2])
    model = build_model(config)
    record = AuxiliaryRecorder()
    routing = model.blocks[0].attention.router(torch.randn(2, 5, config.d_model), record)
    assert routing.chosen.all()
