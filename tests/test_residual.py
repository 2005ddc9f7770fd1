"""LayerScale, DropPath and Dropout on the block's branches."""

from __future__ import annotations

import pytest
import torch

from moa.errors import ConfigError
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.context import ForwardContext
from moa.layers.residual import Dropout, DropPath
from moa.models.language_model import build_model
from tests.conftest import tiny_model_config


def test_layer_scale_of_one_is_the_plain_block_and_small_is_near_identity():
    torch.manual_seed(0)
    plain = build_model(tiny_model_config()).eval()
    scaled = build_model(tiny_model_config(layer_scale_init=1.0)).eval()
    missing = scaled.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"blocks.{i}.{branch}_scale.scale"
                                     for i in range(2) for branch in ("attention", "ffn"))
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(scaled(ids).logits, plain(ids).logits)
    tiny = build_model(tiny_model_config(layer_scale_init=1e-6)).eval()
    x = torch.randn(2, 9, 32)
    ctx = ForwardContext(torch.arange(9), tiny.position, AuxiliaryRecorder())
    torch.testing.assert_close(tiny.blocks[0](x, ctx), x, atol=1e-4, rtol=0)


def test_drop_path_drops_whole_sequences_and_keeps_the_expectation():
    torch.manual_seed(1)
    drop = DropPath(0.25)
    x = torch.ones(4000, 3, 2)
    y = drop.train()(x)
    per_sequence = y.flatten(1)
    assert ((per_sequence == 0).all(1) | (per_sequence == 1 / 0.75).all(1)).all()
    assert y.mean().item() == pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(drop.eval()(x), x)


def test_drop_path_is_off_at_eval_and_active_in_training():
    torch.manual_seed(2)
    plain = build_model(tiny_model_config())
    dropped = build_model(tiny_model_config(drop_path=0.5))
    dropped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (8, 9))
    torch.testing.assert_close(dropped.eval()(ids).logits, plain.eval()(ids).logits)
    assert not torch.allclose(dropped.train()(ids).logits, plain.train()(ids).logits)


@pytest.mark.parametrize(("model", "key"), [
    ({"layer_scale_init": 0.0}, "model.layer_scale_init"),
    ({"drop_path": 1.0}, "model.drop_path"),
])
def test_bad_residual_options_name_their_key(model, key):
    with pytest.raises(ConfigError) as error:
        tiny_model_config(**model)
    assert error.value.key == key


def test_dropout_is_torchs_in_training_and_passes_its_input_where_it_does_nothing():
    x = torch.randn(4, 64, 32)
    dropout = Dropout(0.5).train()
    torch.manual_seed(3)
    dropped = dropout(x)
    torch.manual_seed(3)
    torch.testing.assert_close(dropped, torch.nn.functional.dropout(x, 0.5, training=True))
    assert (dropped == 0).any()
    assert dropout.eval()(x) is x
    assert Dropout(0.0).train()(x) is x
