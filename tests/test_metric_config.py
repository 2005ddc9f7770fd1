"""Metric attention's configuration: each refused value with its key, value and what is
allowed, Hydra composition, the checkpoint round trip, and the kernel each `impl` selects."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from moa.attention.metric import select_kernel
from moa.config import ModelConfig
from moa.errors import ConfigError
from moa.kernels.metric_cpu import metric_attention_cpu
from moa.kernels.metric_reference import metric_attention_eager
from tests.conftest import metric_model_config, tiny_model_config


def test_ball_target_config_names_its_key(compose_config):
    from moa.training.run_config import parse_run

    with pytest.raises(ConfigError, match="attention.ball_target_kept"):
        metric_model_config(use_balls=True, ball_target_kept=1.5)
    with pytest.raises(ConfigError, match="attention.ball_target_kept=0.5 .*use_balls"):
        metric_model_config(ball_target_kept=0.5)
    with pytest.raises(ConfigError, match="attention.ball_target_rate"):
        metric_model_config(use_balls=True, ball_target_kept=0.5, ball_target_rate=0.0)
    cfg = compose_config("attention.paths.1.use_balls=true",
                         "attention.paths.1.ball_target_kept=0.5",
                         "attention.paths.1.ball_target_rate=0.2")
    path = parse_run(cfg).model.attention.paths[1]
    assert (path.ball_target_kept, path.ball_target_rate) == (0.5, 0.2)
    cfg.attention.paths[3].ball_target_kept = 0.5  # the MQA path has no balls
    with pytest.raises(ConfigError, match="attention.paths.3.ball_target_kept"):
        parse_run(cfg)


def test_config_errors_name_their_key():
    with pytest.raises(ConfigError, match="attention.impl"):
        metric_model_config("fast")
    with pytest.raises(ConfigError, match="attention.metric.name"):
        metric_model_config(metric={"name": "l1"})
    with pytest.raises(ConfigError, match="attention.attn_drop"):
        metric_model_config("cpu_fused", attn_drop=0.1)


def test_config_round_trips_through_checkpoint_dict():
    config = metric_model_config(metric={"name": "maha_diag", "maha_init": 2.0}, use_balls=True)
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config
    assert dataclasses.asdict(again.attention)["metric"] == {"name": "maha_diag", "maha_init": 2.0}


def test_hydra_composes_metric_options(compose_config):
    from moa.training.run_config import parse_run

    cfg = compose_config("attention=metric_mqa", "metric=maha_diag", "regularizer=ti",
                         "trainer=smoke")
    attention = parse_run(cfg).model.attention
    assert attention.metric.name == "maha_diag" and attention.n_kv_heads == 1
    assert (attention.ti_reg_weight, attention.ti_reg_samples) == (0.01, 64)
    plain = parse_run(compose_config("model=gpt", "attention=metric")).model.attention
    assert plain.metric.name == "l2" and plain.ti_reg_weight == 0.0


def test_ball_pruning_is_refused_where_attention_is_bidirectional():
    """What check_bidirectional (an encoder's, a memory read's) raises: the key, the value,
    what is allowed and why."""
    metric_model_config().attention.check_bidirectional()
    with pytest.raises(ConfigError, match=(
            r"^invalid config use_balls=True \(ball pruning keeps each query's own key, which "
            r"those have not\); allowed: false where attention is bidirectional or reads a "
            r"memory$")):
        metric_model_config(use_balls=True).attention.check_bidirectional()


# No id names the flash kernel's impl: mutmut's selection deselects tests named for it (they
# need a GPU), and choosing it needs none.
_SELECTED = [("auto", "cpu", "cpu_fused"), ("eager", "cpu", "eager"),
             ("cpu_fused", "cpu", "cpu_fused"), ("triton", "cpu", "flash"),
             ("auto", "cuda", "flash"), ("eager", "cuda", "eager"), ("triton", "cuda", "flash"),
             ("auto", "meta", "eager"), ("cpu_fused", "meta", "eager"),
             ("triton", "meta", "eager")]


@pytest.mark.parametrize(("impl", "device", "kernel"), _SELECTED,
                         ids=[f"{impl.replace('triton', 'flash')}-on-{device}"
                              for impl, device, _ in _SELECTED])
def test_select_kernel_picks_each_impls_kernel_for_the_device(impl, device, kernel):
    """`auto` is the flash kernel on CUDA and cpu_fused elsewhere; an impl named is that
    kernel on every device (the flash kernel's own launch refuses a CPU tensor); a
    shape-only pass on the meta device runs the reference whatever the impl. No GPU needed:
    only the device's type is read."""
    kernels = {"eager": metric_attention_eager, "cpu_fused": metric_attention_cpu}
    if kernel == "flash":
        pytest.importorskip("triton")
        from moa.kernels.metric_triton import metric_attention_triton

        kernels["flash"] = metric_attention_triton
    assert select_kernel(impl, torch.device(device)) is kernels[kernel]


def test_select_kernel_refuses_cpu_fused_off_the_cpu():
    with pytest.raises(ValueError,
                       match=r"^attention\.impl=cpu_fused runs on CPU only, not on cuda:1$"):
        select_kernel("cpu_fused", torch.device("cuda", 1))


@pytest.mark.parametrize(("fields", "message"), [
    ({"dropout": 0.1}, "attention.dropout=0.1; allowed: 0.0 (metric attention: attn_drop)"),
    ({"alpha_init": 0.0}, "attention.alpha_init=0.0; allowed: a positive float, or null for "
                          "1 / (2 sqrt(head_dim))"),
    ({"key_norm": "unit"}, "attention.key_norm='unit'; allowed: free | sphere | ignore"),
    ({"radius_init": 0.0}, "attention.radius_init=0.0; allowed: a positive float"),
    ({"ball_band": 0.0}, "attention.ball_band=0.0; allowed: a positive float"),
    ({"use_balls": True, "ball_target_kept": 0.0},
     "attention.ball_target_kept=0.0; allowed: 0.0 < ball_target_kept <= 1.0"),
    ({"ball_target_kept": 0.5}, "attention.ball_target_kept=0.5 (the target moves the radius "
                                "of a ball); allowed: null unless use_balls and learn_radius "
                                "are true"),
    ({"ball_target_rate": 1.5},
     "attention.ball_target_rate=1.5; allowed: 0.0 < ball_target_rate <= 1.0"),
    ({"origin_init_scale": -0.5}, "attention.origin_init_scale=-0.5; allowed: >= 0"),
    ({"impl": "eager", "attn_drop": 1.0},
     "attention.attn_drop=1.0; allowed: 0.0 <= attn_drop < 1.0"),
    ({"impl": "eager", "attn_drop": -0.5},
     "attention.attn_drop=-0.5; allowed: 0.0 <= attn_drop < 1.0"),
    ({"proj_drop": 1.0}, "attention.proj_drop=1.0; allowed: 0.0 <= proj_drop < 1.0"),
    ({"proj_drop": -0.5}, "attention.proj_drop=-0.5; allowed: 0.0 <= proj_drop < 1.0"),
    ({"impl": "cpu_fused", "attn_drop": 0.1}, "attention.attn_drop=0.1 (the fused kernels have "
                                              "no attention dropout); allowed: 0.0 unless "
                                              "impl=eager"),
    ({"ti_reg_weight": -0.5}, "attention.ti_reg_weight=-0.5; allowed: >= 0"),
    ({"ti_reg_samples": 0}, "attention.ti_reg_samples=0; allowed: a positive integer"),
    ({"metric": {"name": "maha_diag", "maha_init": 0.0}},
     "attention.metric.maha_init=0.0; allowed: a positive float"),
], ids=lambda case: "-".join(case) if isinstance(case, dict) else None)
def test_each_refused_value_names_its_key_value_and_what_is_allowed(fields, message):
    """The whole message, at the edge of each allowed range (0 where a value must be
    positive, the open low end of a fraction, past its closed high end)."""
    with pytest.raises(ConfigError, match=f"^invalid config {re.escape(message)}$"):
        tiny_model_config({"name": "metric", **fields})


def test_the_closed_edges_of_each_range_are_allowed():
    config = metric_model_config(use_balls=True, ball_target_kept=1.0, ball_target_rate=1.0,
                            origin_init_scale=0.0, ti_reg_weight=0.0, ti_reg_samples=1)
    assert config.attention.ti_reg_samples == 1 and config.attention.ball_target_kept == 1.0
