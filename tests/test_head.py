"""LM heads: the linear head is today's, the MoA head is causal, decodes with the cache,
has the documented size, names bad keys, and trains."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from moa.errors import ConfigError
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.context import ForwardContext
from moa.layers.head import HEAD
from moa.layers.position import POSITION
from moa.models.generation import SamplingConfig, generate
from moa.models.language_model import build_model
from moa.training import train
from tests.conftest import assert_cached_matches_full
from tests.test_hyper_ffn import C, hyper, model_config

V = 50


def moa_head(router: dict | None = None, **head) -> dict:
    return {"name": "moa", "head_dim": 8, "attention": {
        "name": "mixture",
        "paths": [{"name": "dot_product", "n_q_heads": 2}, {"name": "dot_product", "n_kv_heads": 1},
                  {"name": "channel_mix", "mixer_hidden": 24}],
        "router": router or {"name": "softmax", "router_hidden": 8}},
        "ffn": {"name": "swiglu", "hidden_dim": 40}, **head}


def swiglu() -> dict:
    return {"name": "swiglu"}


def test_linear_head_is_the_tied_projection_of_before():
    torch.manual_seed(0)
    model = build_model(model_config(swiglu()))
    assert model.lm_head.weight is model.embedding.weight
    assert "lm_head.weight" in model.state_dict()
    old = model.config.to_dict()
    del old["head"]  # a checkpoint's config from before heads were a group
    again = build_model(type(model.config).from_dict(old))
    again.load_state_dict(model.state_dict())  # same keys, strict
    ids = torch.randint(0, V, (2, 7))
    hidden = model.norm(model.embedding(ids))
    ctx = ForwardContext(torch.arange(7), model.position, AuxiliaryRecorder())
    torch.testing.assert_close(model.lm_head(hidden, ctx), hidden @ model.embedding.weight.T)


def head_and_context(config, T: int):
    embedding = torch.nn.Embedding(V, C)
    head = HEAD.build(config.head, config, embedding).eval()
    position = POSITION.build(config.position, config.max_seq_len, C, config.head_dim)
    return head, ForwardContext(torch.arange(T), position, AuxiliaryRecorder())


@pytest.mark.parametrize("router", [{"name": "softmax"}, {"name": "topk", "router_topk": 1}])
def test_moa_head_is_causal(router):
    torch.manual_seed(1)
    config = model_config(swiglu(), moa_head(router))
    head, ctx = head_and_context(config, 11)
    x = torch.randn(2, 11, C)
    logits = head(x, ctx)
    assert logits.shape == (2, 11, V)
    x2 = x.clone()
    x2[:, 6:] = torch.randn_like(x2[:, 6:])
    logits2 = head(x2, ctx)
    torch.testing.assert_close(logits2[:, :6], logits[:, :6])
    assert not torch.allclose(logits2[:, 6:], logits[:, 6:])


def test_moa_head_uses_its_own_head_dim_and_tied_projection():
    config = model_config(swiglu(), moa_head())
    model = build_model(config)
    paths = model.lm_head.attention.paths
    assert [(p.heads.n_q_heads, p.heads.n_kv_heads, p.heads.head_dim) for p in paths[:2]] == \
        [(2, 2, 8), (4, 1, 8)]
    assert model.lm_head.vocab.weight is model.embedding.weight
    wide = build_model(model_config(swiglu(), moa_head(), head_dim=12))  # the blocks' heads
    assert wide.blocks[0].attention.heads.head_dim == 12
    assert [p.heads.head_dim for p in wide.lm_head.attention.paths[:2]] == [8, 8]
    default = model_config(swiglu(), {"name": "moa", "head_dim": 8})  # MHA + MQA + channel mix
    assert [p.name for p in default.head.attention.paths] == ["dot_product"] * 2 + ["channel_mix"]
    assert type(default).from_dict(default.to_dict()) == default  # what checkpoints store


FFNS = {"swiglu": swiglu(), "hyper_block": hyper({"name": "topk", "router_topk": 2}),
        "hyper_shared": hyper(placement="shared")}


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("router", [{"name": "softmax"}, {"name": "topk", "router_topk": 2}])
def test_cached_decoding_equals_full_forward(ffn, router):
    torch.manual_seed(2)
    model = build_model(model_config(FFNS[ffn], moa_head(router))).eval()
    assert_cached_matches_full(model, torch.randint(0, V, (2, 12)))
    cache = model.new_cache()
    model(torch.randint(0, V, (1, 4)), cache)
    assert cache.head.state["paths.1"].lengths["k"] == 4  # the head's MQA path


def test_cached_generation_equals_uncached():
    torch.manual_seed(3)
    model = build_model(model_config(hyper(placement="shared"), moa_head({"name": "topk"})))
    prompt = torch.randint(0, V, (2, 4))
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    uncached = SamplingConfig(max_new_tokens=12, temperature=0.0, use_cache=False)
    assert torch.equal(generate(model, prompt, greedy), generate(model, prompt, uncached))


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_formula_matches_the_module(tie):
    """The module docstring's count: D = 8, paths (h, g) = (2, 2) and (4, 1), mixer 24,
    linear-GELU router of width 8 over 3 paths, SwiGLU 40, three RMSNorms."""
    config = model_config(swiglu(), moa_head(), tie_embeddings=tie)
    model = build_model(config)
    D = 8
    attention = C * D * (2 * 2 + 2 * 2) + C * D * (2 * 4 + 2 * 1) + 2 * C * 24
    router = C * 8 + 8 + 8 * 3 + 3
    expected = attention + router + 3 * C * 40 + 3 * C + (0 if tie else V * C)
    own = [p for p in model.lm_head.parameters() if p is not model.embedding.weight]
    assert sum(p.numel() for p in own) == expected


@pytest.mark.parametrize(("head", "key"), [
    (moa_head(head_dim=5), "head.head_dim"),
    ({**moa_head(), "attention": {"name": "dot_product", "n_kv_heads": 3}},
     "head.attention.n_kv_heads"),
    ({**moa_head(), "attention": {"name": "mixture", "paths": [
        {"name": "dot_product"}, {"name": "dot_product", "n_q_heads": 8}]}},
     "head.attention.paths.1.n_q_heads"),
    (moa_head(proj_drop=1.5), "head.proj_drop"),
    ({"name": "nope"}, "head.name"),
])
def test_bad_head_configs_name_their_key(head, key):
    with pytest.raises(ConfigError) as error:
        model_config(swiglu(), head)
    assert error.value.key == key


@pytest.mark.slow
def test_smoke_train_with_hyper_ffn_and_moa_head(compose_config, tmp_path):
    cfg = compose_config("trainer=smoke", "ffn=hyper", "head=moa", "trainer.max_steps=6",
                         "trainer.log_every_n_steps=2", "evaluate=false", "tokenizer=byte",
                         "model.n_layers=1")
    _, objects = train(cfg)
    config = objects["module"].model_config
    assert (config.ffn.name, config.head.name) == ("hyper", "moa")
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert rows and all(math.isfinite(float(row["train/loss"])) for row in rows)
    for scope in ("layers.0.ffn.router", "head.attention.router"):
        usage = sum(float(rows[0][f"train/stats/{scope}.usage.{i}"]) for i in range(3))
        assert usage == pytest.approx(1.0)
