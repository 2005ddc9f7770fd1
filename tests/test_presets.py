"""The MoA cards' presets: `model=discoverlm` (DiscoverLM-70M) and `model=moa_metric`
(MoAMetricLM-100M). At `model.size=card` their parameter counts match the cards; at
`tiny` they train, stay causal and decode with a cache as they run in full."""

from __future__ import annotations

import math

import pytest
import torch

from moa.models.language_model import build_model
from moa.models.params import parameter_table
from moa.params import model_config
from moa.training import METRIC_KEYS, train
from moa.training.run_config import parse_run
from tests.conftest import assert_cached_matches_full

PRESETS = ["discoverlm", "moa_metric"]


def card_rows(preset: str) -> dict[str, int]:
    """Top-level rows of `python -m moa.params model=<preset> model.size=card`."""
    with torch.device("meta"):
        model = build_model(model_config([f"model={preset}", "model.size=card"]))
    return {name: count for name, count in parameter_table(model) if not name.startswith(" ")}


def discoverlm_budget() -> dict[str, int]:
    """Our components in the rows of DiscoverLM-70M's parameter budget."""
    rows = card_rows("discoverlm")
    return {
        "embedding": rows["embedding"],
        "blocks": rows["blocks"],  # the attention mixtures and their norms
        "hyper_ffn": rows["shared_ffn"],
        "lm_head": rows["lm_head"],  # tied: the head's mixture, FFN and norms
        "rope_and_norms": rows["position"] + rows["norm"],
    }


def test_discoverlm_card_total_is_the_cards():
    assert sum(card_rows("discoverlm").values()) == pytest.approx(69.1e6, rel=0.03)


@pytest.mark.parametrize(("row", "card"), [
    ("embedding", 24.6e6), ("blocks", 28.9e6), ("hyper_ffn", 4.2e6), ("lm_head", 10.8e6),
])
def test_discoverlm_budget_rows_are_the_cards(row, card):
    assert discoverlm_budget()[row] == pytest.approx(card, rel=0.10)


@pytest.mark.xfail(strict=True, reason="our BlackHoleRoPE and RMSNorms hold a few thousand "
                   "parameters; the card's 0.6M row counts parts this model does not have")
def test_discoverlm_rope_and_norms_row_is_the_cards():
    assert discoverlm_budget()["rope_and_norms"] == pytest.approx(0.6e6, rel=0.10)


def test_moa_metric_card_total_is_the_cards():
    assert sum(card_rows("moa_metric").values()) == pytest.approx(185e6, rel=0.10)


def test_discoverlm_card_is_the_cards_shape(compose_config):
    model = parse_run(compose_config("model=discoverlm", "model.size=card")).model
    assert (model.d_model, model.n_layers, model.n_heads, model.vocab_size) == (512, 4, 64, 48000)
    paths = model.attention.paths
    assert [path.name for path in paths] == ["local_conv", "metric", "channel_mix", "metric"]
    assert paths[3].n_kv_heads == 1
    assert model.attention.router.name == "topk" and model.attention.router.router_topk == 2
    for metric_path in (paths[1], paths[3]):
        assert metric_path.metric.name == "maha_diag" and metric_path.use_balls
        assert (metric_path.ti_reg_weight, metric_path.ti_reg_samples) == (0.01, 64)
    assert model.ffn.name == "hyper" and model.ffn.placement == "shared"
    assert model.head.name == "moa" and model.position.name == "blackhole_rope"


def test_metric_choice_reaches_every_metric_path(compose_config):
    model = parse_run(compose_config("model=moa_metric", "metric=cosine")).model
    assert [path.metric.name for path in model.attention.paths if path.name == "metric"] == [
        "cosine", "cosine"]


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_preset_trains(preset, compose_config):
    """A few steps take the loss well below the uniform guess's log(V), where a tiny
    preset starts, on the validation and the test split alike."""
    metrics, objects = train(compose_config(
        "trainer=smoke", f"model={preset}", "trainer.max_steps=6", "trainer.val_check_interval=3",
        "optim.warmup_steps=1"))
    assert set(metrics) == set(METRIC_KEYS)
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    uniform = math.log(objects["datamodule"].vocab_size)
    for split in ("val", "test"):
        assert metrics[f"{split}_loss"] < uniform - 0.3, metrics
        assert metrics[f"{split}_ppl"] == pytest.approx(math.exp(metrics[f"{split}_loss"]))
        assert 0 < metrics[f"{split}_acc"] < 1


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_preset_is_causal_and_caches(preset, compose_config):
    config = parse_run(compose_config(f"model={preset}", "model.size=tiny")).model.with_vocab(97)
    torch.manual_seed(0)
    model = build_model(config).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
        changed = ids.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % 97
        torch.testing.assert_close(model(changed).logits[:, :7], logits[:, :7])
        assert_cached_matches_full(model, ids)
