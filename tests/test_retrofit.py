"""Retrofitting a trained model with another attention (`moa/models/retrofit.py` and
`eval.py attention_override=`): which trained weights carry over, which are derived or
left untrained, and the refusal of a retrofit that carries no trained attention."""

from __future__ import annotations

import json
import math
import re

import pytest

from moa.errors import ConfigError
from moa.models.language_model import build_model
from moa.models.retrofit import swap_attention, transfer_weights
from tests.conftest import tiny_model_config


def test_retrofit_of_dot_product_maps_q_k_as_l2_with_matching_alpha():
    config = tiny_model_config({"name": "dot_product", "n_kv_heads": 2})
    swapped = swap_attention(config, {"name": "alcca", "k": 8})
    assert swapped.attention.metric.name == "l2" and swapped.attention.n_kv_heads == 2
    assert swapped.attention.alpha_init == pytest.approx(1 / (2 * math.sqrt(config.head_dim)))
    trained = build_model(config).state_dict()
    report = transfer_weights(build_model(swapped), trained)
    assert report.unexpected == []
    assert report.missing == [f"blocks.{i}.attention.log_alpha" for i in range(2)]
    # the alpha is derived from the trained head width, not left untrained
    assert report.derived(config) == report.missing and report.untrained(config) == []
    assert report.carried == sorted(trained)  # every trained weight has its place


def test_retrofit_of_a_moa_block_reports_what_it_cannot_carry():
    """The MoA mixture's paths swapped for one ALCCA: the mixture's own weights have no
    place (unused) and ALCCA's projections nothing trained to load (initialised)."""
    config = tiny_model_config({"name": "mixture", "paths": [
        {"name": "local_conv"}, {"name": "metric"}, {"name": "channel_mix"}]})
    trained = build_model(config).state_dict()
    report = transfer_weights(build_model(swap_attention(config, {"name": "alcca", "k": 8})),
                              trained)
    assert report.untrained(config) and report.unexpected
    assert all(".attention." in key for key in report.untrained(config) + report.unexpected)
    assert set(report.carried) | set(report.unexpected) == set(trained)
    assert not set(report.carried) & set(report.unexpected)


@pytest.mark.slow
def test_eval_retrofit_of_a_metric_model_reports_no_change_at_full_k(compose_config, tmp_path):
    """eval.py run_dir=DIR attention_override=alcca with k >= L, theta = 0 and softmax: the
    retrofitted model is the trained one, so the reported loss change is zero."""
    from moa.training import evaluate, train

    trained, _ = train(compose_config("trainer=smoke", "model=gpt", "attention=metric",
                                      "attention.impl=eager",
                                      "trainer.max_steps=6", "trainer.val_check_interval=3"))
    metrics, _ = evaluate(compose_config(
        f"run_dir={tmp_path / 'run'}", "attention_override=alcca", "alcca.k=100000",
        "alcca.weighting=softmax", "sampling.max_new_tokens=2", "trainer.limit_test_batches=2",
        config_name="eval"))
    assert metrics["delta_val_loss"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["val_loss"] == pytest.approx(metrics["baseline_val_loss"], abs=1e-4)
    run_dir = tmp_path / "run"
    written = json.loads((run_dir / "metrics_alcca.json").read_text())
    weights = written.pop("weights")
    assert written == pytest.approx(metrics)
    assert weights["initialised"] == weights["unused"] == weights["derived"] == []
    assert any(".attention." in key for key in weights["carried"])  # the trained attention
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(trained)


def test_eval_refuses_a_retrofit_that_carries_no_attention_unless_allowed(compose_config,
                                                                          tmp_path):
    """eval.py attention_override=alcca on a moa_metric run: its MoA block's trained paths
    have no place in one ALCCA, so it is refused before any evaluation; allow_untrained=true
    runs it, and metrics_alcca.json names the weights initialised and unused."""
    from moa.training import evaluate, train

    train(compose_config("trainer=smoke", "model=moa_metric", "tokenizer=byte",
                         "trainer.max_steps=2", "trainer.val_check_interval=2",
                         "evaluate=false"))
    run_dir = tmp_path / "run"
    retrofit = (f"run_dir={run_dir}", "checkpoint=last", "attention_override=alcca",
                "alcca.k=8", "sampling.prompts=[]", "trainer.limit_test_batches=1",
                "trainer.limit_val_batches=1")
    with pytest.raises(ConfigError) as error:
        evaluate(compose_config(*retrofit, config_name="eval"))
    assert error.value.key == "attention_override" and "allow_untrained=true" in str(error.value)
    assert not (run_dir / "metrics_alcca.json").exists()

    metrics, _ = evaluate(compose_config(*retrofit, "allow_untrained=true", config_name="eval"))
    weights = json.loads((run_dir / "metrics_alcca.json").read_text())["weights"]
    assert weights["initialised"] and weights["unused"]
    block_attention = re.compile(r"model\.blocks\.\d+\.attention\.")
    assert any(block_attention.match(key) and ".paths." in key for key in weights["unused"])
    assert weights["carried"]  # the embeddings, FFNs, norms and head
    assert not any(block_attention.match(key) for key in weights["carried"])
    assert math.isfinite(metrics["delta_val_loss"])
