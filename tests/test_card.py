"""A MoA card's config.json, keys as written: `model.card_config=FILE` (moa/training/card.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moa.errors import ConfigError
from moa.training.card import CARD_KEYS
from moa.training.run_config import parse_run

# MoA-100M's shape in the card's own keys, with Hugging Face's bookkeeping beside them.
MOA_100M = {
    "model_type": "moa_metric", "architectures": ["MoAMetricLM"], "torch_dtype": "float32",
    "dim": 768, "num_layers": 10, "attn_heads": 12, "vocab_size": 50277,
    "max_position_embeddings": 2048,
}


def write_card(tmp_path, card: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(card))
    return str(path)


def without_provenance(model):
    return dataclasses.replace(model, size="", sizes={}, card_config=None)


def test_card_config_builds_the_card_sized_preset(compose_config, tmp_path):
    card = write_card(tmp_path, MOA_100M)
    from_card = parse_run(compose_config("model=moa_metric", "model.size=tiny",
                                         f"model.card_config={card}")).model
    preset = parse_run(compose_config("model=moa_metric", "model.size=card")).model
    assert without_provenance(from_card) == without_provenance(preset)


def test_card_keys_land_where_the_table_says(compose_config, tmp_path):
    card = write_card(tmp_path, {
        "dim": 96, "attn_heads": 6, "mqa_q_heads": 3, "conv_kernel": 3, "mixer_hidden": 200,
        "metric": "cosine", "use_balls": True, "radius_init": 2.5, "ti_reg_weight": 0.05,
        "router_topk": 3, "router_hidden": 40, "ffn_hidden": 160, "lr_rank": 8,
        "n_branches": 2, "theta_base": 500.0, "energy_amplification": 0.5,
        "lm_head_dim": 32, "lm_ffn_hidden": 120, "layer_scale_init_value": 0.1,
    })
    model = parse_run(compose_config("model=moa_metric", "model.size=tiny",
                                     f"model.card_config={card}")).model
    conv, mha, mixer, mqa = model.attention.paths
    assert (model.d_model, model.n_heads, model.layer_scale_init) == (96, 6, 0.1)
    assert (conv.conv_kernel, model.ffn.conv_kernel, mixer.mixer_hidden) == (3, 3, 200)
    assert mqa.n_q_heads == 3 and mqa.n_kv_heads == 1
    for path in (mha, mqa):
        assert path.metric.name == "cosine" and path.use_balls
        assert (path.radius_init, path.ti_reg_weight) == (2.5, 0.05)
    router = model.attention.router
    assert (router.router_topk, router.router_hidden) == (3, 40)
    assert (model.ffn.hidden_dim, model.ffn.lr_rank, model.ffn.branches) == (
        160, 8, ["swiglu", "conv"])
    assert (model.position.theta_base, model.position.energy_amplification) == (500.0, 0.5)
    assert (model.head.head_dim, model.head.ffn.hidden_dim) == (32, 120)


def test_every_card_key_addresses_an_existing_entry(compose_config):
    """A renamed config entry would make a card key set a field nothing reads."""
    model = parse_run(compose_config("model=moa_metric")).model
    sections = {"model": model, "metric": model.attention.paths[1].metric,
                "router": model.attention.router}
    missing = []
    for key, targets in CARD_KEYS.items():
        for target in targets:
            section, _, leaf = target.rpartition(".")
            node = sections.get(section, model)
            if node is model and section != "model":
                for part in section.split("."):
                    node = node[int(part)] if part.isdigit() else getattr(node, part)
            if leaf not in {f.name for f in dataclasses.fields(node)}:
                missing.append(f"{key} -> {target}")
    assert not missing


@pytest.mark.parametrize(("card", "reason"), [
    ({"dim": 768, "n_embd": 768}, "unknown key 'n_embd'"),
    ({"n_branches": 5}, "1, 2 or 3"),
    ({"attn_heads": 7}, "n_heads"),
])
def test_bad_card_configs_name_the_key(compose_config, tmp_path, card, reason):
    path = write_card(tmp_path, card)
    with pytest.raises(ConfigError, match=reason):
        parse_run(compose_config("model=moa_metric", "model.size=tiny",
                                 f"model.card_config={path}"))


def test_card_config_needs_the_moa_block(compose_config, tmp_path):
    path = write_card(tmp_path, MOA_100M)
    with pytest.raises(ConfigError, match="model.card_config.*attention=moa"):
        parse_run(compose_config("model=moa_metric", "attention=mha",
                                 f"model.card_config={path}"))


def test_missing_or_broken_card_file_names_the_key(compose_config, tmp_path):
    with pytest.raises(ConfigError, match="model.card_config.*not found"):
        parse_run(compose_config("model=moa_metric", f"model.card_config={tmp_path}/no.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{dim: 768")
    with pytest.raises(ConfigError, match="model.card_config.*not JSON"):
        parse_run(compose_config("model=moa_metric", f"model.card_config={broken}"))
