"""HyperFFN: its definition, causality, sparse == dense, placements, cached decoding, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa.config import ModelConfig
from moa.errors import ConfigError
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.ffn import FFN
from moa.models.language_model import build_model
from tests.conftest import (
    assert_cached_matches_full,
    assert_causal,
    assert_same_outputs_and_gradients,
    forward_context,
)

C = 32


def hyper(router: dict | None = None, **ffn) -> dict:
    return {"name": "hyper", "hidden_dim": 40, "conv_kernel": 3, "conv_hidden": 24,
            "lr_rank": 4, "router": router or {"name": "softmax", "router_hidden": 16}, **ffn}


def model_config(ffn: dict, head: dict | None = None, **model) -> ModelConfig:
    sections = {"d_model": C, "n_layers": 2, "n_heads": 4, "vocab_size": 50, "max_seq_len": 64,
                **model}
    return ModelConfig.from_sections(
        sections, attention={"name": "dot_product"}, ffn=ffn, position={"name": "rope"},
        norm={"name": "rmsnorm"}, head=head or {"name": "linear"})


def build_ffn(ffn: dict, bias: bool = False):
    config = model_config(ffn)
    return FFN.build(config.ffn, C, bias).eval(), config


def glu(x, gate_up, down):
    gate, up = (x @ gate_up.weight.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.weight.T


def reference(module, x):
    """sum_i w_i branch_i(x), each branch written out: SwiGLU, conv then GELU MLP, low rank."""
    weights = module.router(x, AuxiliaryRecorder()).weights  # (B, T, 3)
    swiglu, conv, low_rank = module.branches
    kernel = conv.depthwise.weight[:, 0]  # (C, K)
    K, T = kernel.size(1), x.size(1)
    padded = F.pad(x, (0, 0, K - 1, 0))  # (B, K - 1 + T, C)
    h = sum(padded[:, j:j + T] * kernel[:, j] for j in range(K))
    mlp = conv.pointwise
    outputs = [glu(x, swiglu.gate_up, swiglu.down),
               F.gelu(h @ mlp.up.weight.T) @ mlp.down.weight.T,
               glu(x, low_rank.gate_up, low_rank.down)]
    return sum(weights[..., i:i + 1] * y for i, y in enumerate(outputs))


def test_hyper_ffn_equals_its_definition():
    torch.manual_seed(0)
    module, config = build_ffn(hyper())
    x = torch.randn(2, 9, C)
    torch.testing.assert_close(module(x, forward_context(config, 9)), reference(module, x))


@pytest.mark.parametrize("router", [{"name": "softmax"}, {"name": "topk", "router_topk": 1}])
def test_hyper_ffn_is_causal(router):
    torch.manual_seed(1)
    module, config = build_ffn(hyper(router))
    assert_causal(module, config, T=11, t=5)


def test_conv_branch_sees_its_window():
    torch.manual_seed(2)
    module, config = build_ffn(hyper(branches=["conv"]))  # kernel 3: positions t-2..t
    x = torch.randn(1, 10, C)
    y = module(x, forward_context(config, 10))
    far, near = x.clone(), x.clone()
    far[:, 5] += 1.0
    near[:, 6] += 1.0
    torch.testing.assert_close(module(far, forward_context(config, 10))[:, 8], y[:, 8])
    assert not torch.allclose(module(near, forward_context(config, 10))[:, 8], y[:, 8])


@pytest.mark.parametrize("k", [1, 2])
def test_sparse_topk_equals_dense_with_unrouted_weights_zeroed(k):
    torch.manual_seed(3)
    module, config = build_ffn(hyper({"name": "topk", "router_topk": k,
                                      "enable_feature_gates": True}))
    with torch.no_grad():
        module.feature_gates.weight.normal_(std=0.1)
    x = torch.randn(2, 10, C, requires_grad=True)
    rows_seen = []
    module.branches[0].gate_up.register_forward_hook(
        lambda m, i, o: rows_seen.append(i[0].shape[0]))
    sparse = module(x, forward_context(config, 10))
    routing = module.router(x, AuxiliaryRecorder())
    assert rows_seen == [routing.chosen[..., 0].sum().item()]  # swiglu ran on its tokens only
    ctx = forward_context(config, 10)
    dense = sum(routing.weights[..., i:i + 1] * module.feature_gates(i, x, branch(x, ctx))
                for i, branch in enumerate(module.branches))
    assert_same_outputs_and_gradients(sparse, dense, [x, *module.parameters()])


@pytest.mark.parametrize("placement", ["block", "shared"])
@pytest.mark.parametrize("router", [{"name": "softmax"}, {"name": "topk", "router_topk": 2}])
def test_cached_decoding_equals_full_forward(placement, router):
    torch.manual_seed(4)
    model = build_model(model_config(hyper(router, placement=placement))).eval()
    assert_cached_matches_full(model, torch.randint(0, 50, (2, 12)))


def test_shared_placement_puts_one_ffn_after_the_stack_with_its_own_cache():
    torch.manual_seed(5)
    model = build_model(model_config(hyper(placement="shared"))).eval()
    assert all(block.ffn is None for block in model.blocks)
    assert not any(".ffn" in name for name, _ in model.blocks.named_parameters())
    cache = model.new_cache()
    model(torch.randint(0, 50, (1, 5)), cache)
    assert cache.ffn.state["branches.1"].state["conv"].shape == (1, 2, C)  # the last K - 1
    assert "ffn.router.usage.0" in model.train()(torch.randint(0, 50, (1, 5))).stats
    per_block = build_model(model_config(hyper())).eval()
    cache = per_block.new_cache()
    per_block(torch.randint(0, 50, (1, 5)), cache)
    assert cache.layers[1].state["ffn"].state["branches.1"].state["conv"].shape == (1, 2, C)
    assert "layers.1.ffn.router.usage.2" in per_block.train()(torch.randint(0, 50, (1, 5))).stats


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("router", [
    {"name": "softmax"},
    {"name": "topk", "router_hidden": 8, "enable_router_gates": True,
     "enable_feature_gates": True},
    {"name": "static"},
])
def test_parameter_formula_matches_the_module(bias, router):
    config = model_config(hyper(router)).ffn
    module = FFN.build(config, C, bias)
    assert config.num_parameters(C, bias) == sum(p.numel() for p in module.parameters())


def test_sizes_reach_the_discoverlm_hyper_ffn_row():
    """The card's d 512, ffn_hidden 1536, conv_kernel 5, lr_rank 32 with a linear router:
    swiglu 2.36M + low rank 0.05M, so a conv width of 1746 makes the card's 4.2M."""
    config = model_config(hyper({"name": "softmax"}, hidden_dim=1536, conv_kernel=5,
                                conv_hidden=1746, lr_rank=32), d_model=512, n_heads=8).ffn
    assert config.num_parameters(512) == pytest.approx(4.2e6, rel=0.002)


@pytest.mark.parametrize(("ffn", "key"), [
    (hyper(branches=["swiglu", "nope"]), "ffn.branches"),
    (hyper({"name": "topk", "router_topk": 4}), "ffn.router.router_topk"),
    (hyper(placement="middle"), "ffn.placement"),
    (hyper(lr_rank=0), "ffn.lr_rank"),
])
def test_bad_hyper_configs_name_their_key(ffn, key):
    with pytest.raises(ConfigError) as error:
        model_config(ffn)
    assert error.value.key == key
