"""The per-token and local paths, alone: shapes, causality, references, cached decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa.attention import ATTENTION
from moa.errors import ConfigError
from moa.models.language_model import build_model
from tests.conftest import (
    assert_cached_matches_full,
    assert_causal,
    forward_context,
    tiny_model_config,
)

PATHS = {"local_conv": {"name": "local_conv", "conv_kernel": 3},
         "channel_mix": {"name": "channel_mix", "mixer_hidden": 24}}


@pytest.mark.parametrize("path", PATHS)
def test_path_shape_and_causality(path):
    torch.manual_seed(0)
    config = tiny_model_config(PATHS[path])
    assert_causal(ATTENTION.build(config.attention, config).eval(), config)


def test_local_conv_equals_its_definition():
    """y_t = W_pointwise (sum_j w_cj x_{t-K+1+j}), with x before position 0 taken as 0."""
    torch.manual_seed(1)
    config = tiny_model_config(PATHS["local_conv"])
    conv = ATTENTION.build(config.attention, config)
    x = torch.randn(2, 9, config.d_model)
    kernel = conv.depthwise.weight[:, 0]  # (C, K)
    K = kernel.size(1)
    padded = F.pad(x, (0, 0, K - 1, 0))  # (B, K - 1 + T, C)
    depthwise = sum(padded[:, j:j + 9] * kernel[:, j] for j in range(K))
    expected = depthwise @ conv.pointwise.weight.T
    torch.testing.assert_close(conv(x, forward_context(config, 9)), expected)


def test_local_conv_sees_exactly_its_window():
    torch.manual_seed(2)
    config = tiny_model_config(PATHS["local_conv"])  # kernel 3: positions t-2..t
    conv = ATTENTION.build(config.attention, config)
    x = torch.randn(1, 10, config.d_model)
    y = conv(x, forward_context(config, 10))
    far, near = x.clone(), x.clone()
    far[:, 5] += 1.0  # three positions before t = 8
    near[:, 6] += 1.0  # two positions before
    torch.testing.assert_close(conv(far, forward_context(config, 10))[:, 8], y[:, 8])
    assert not torch.allclose(conv(near, forward_context(config, 10))[:, 8], y[:, 8])


def test_channel_mix_is_per_token():
    torch.manual_seed(3)
    config = tiny_model_config(PATHS["channel_mix"])
    mix = ATTENTION.build(config.attention, config)
    x = torch.randn(2, 8, config.d_model)
    order = torch.randperm(8)
    y = mix(x, forward_context(config, 8))
    torch.testing.assert_close(mix(x[:, order], forward_context(config, 8)), y[:, order])
    assert mix.up.out_features == 24


@pytest.mark.parametrize("path", PATHS)
def test_cached_generation_equals_uncached(path):
    torch.manual_seed(4)
    model = build_model(tiny_model_config(PATHS[path])).eval()
    assert_cached_matches_full(model, torch.randint(0, 50, (2, 12)))


@pytest.mark.parametrize(("attention", "key"), [
    ({"name": "local_conv", "conv_kernel": 0}, "attention.conv_kernel"),
    ({"name": "channel_mix", "mixer_hidden": -1}, "attention.mixer_hidden"),
    ({"name": "channel_mix", "dropout": 1.5}, "attention.dropout"),
])
def test_bad_path_configs_name_their_key(attention, key):
    with pytest.raises(ConfigError) as error:
        tiny_model_config(attention)
    assert error.value.key == key
