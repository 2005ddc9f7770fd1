"""A position encoding that claims relative positions keeps every attention scheme's output
unchanged when every position moves by the same offset: rope and BlackHoleRoPE's rotation,
under each scheme of conf/attention/ and each metric (maha_diag with unequal weights:
applied after the rotation, they made scores depend on absolute positions). BlackHoleRoPE's
value gate is absolute by design (docs/attention.md), so it is switched off here and
tested to break the property."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.context import ForwardContext
from moa.models.language_model import build_model
from moa.params import model_config

CONF = Path(__file__).parents[1] / "conf"
SCHEMES = sorted(path.stem for path in (CONF / "attention").glob("*.yaml"))
METRIC_SCHEMES = {"metric", "metric_mqa", "alcca", "moa"}
ROTARY = [("rope",), ("blackhole_rope", "position.enable_v_energy=false")]
CASES = [(scheme, metric, position) for scheme in SCHEMES for position in ROTARY
         for metric in (("l2", "cosine", "maha_diag") if scheme in METRIC_SCHEMES else ("l2",))]


def attention_and_position(scheme: str, metric: str, position: tuple[str, ...]):
    """Block 0's attention and the position encoding of a tiny float64 model whose every
    parameter is random (so Mahalanobis weights, RoPE perturbations and routers are not
    at their uniform starting values)."""
    config = model_config(["model=gpt", "model.size=tiny", f"attention={scheme}",
                           f"metric={metric}", f"position={position[0]}", *position[1:],
                           "tokenizer=byte", "model.vocab_size=300", "model.max_seq_len=64"])
    torch.manual_seed(0)
    model = build_model(config).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.blocks[0].attention.eval(), model.position, config


def outputs_at(attention, position, x: torch.Tensor, start: int) -> torch.Tensor:
    positions = torch.arange(start, start + x.size(1))
    with torch.no_grad():
        return attention(x, ForwardContext(positions, position, AuxiliaryRecorder()))


@pytest.mark.parametrize("scheme, metric, position", CASES)
def test_shifting_every_position_leaves_attention_unchanged(scheme, metric, position):
    attention, encoding, config = attention_and_position(scheme, metric, position)
    x = torch.randn(2, 11, config.d_model, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    at_zero = outputs_at(attention, encoding, x, 0)
    for offset in (1, 7, 40):
        # the rotation angles are float32 (autocast-proof): their rounding sets the tolerance
        torch.testing.assert_close(outputs_at(attention, encoding, x, offset), at_zero,
                                   rtol=1e-4, atol=1e-5)


def shift_changes_outputs(attention, encoding, x: torch.Tensor) -> bool:
    return not torch.allclose(outputs_at(attention, encoding, x, 7),
                              outputs_at(attention, encoding, x, 0), rtol=1e-3, atol=1e-4)


def test_the_check_sees_absolute_positions():
    """The same check fails where positions are absolute: BlackHoleRoPE's value gate, and
    Mahalanobis weights applied after the rotation (format-1 models)."""
    attention, encoding, config = attention_and_position(
        "mha", "l2", ("blackhole_rope", "position.enable_v_energy=true"))
    x = torch.randn(2, 11, config.d_model, dtype=torch.float64)
    assert shift_changes_outputs(attention, encoding, x)

    attention, encoding, config = attention_and_position("metric", "maha_diag", ("rope",))
    def format_one(x, ctx, fold_alpha=False):  # Mahalanobis weights after the rotation
        q, k, v = attention.heads.split(x)
        q, k = attention.to_metric_space(*ctx.position.rotate(q, k, ctx.positions))
        return q * attention._query_factor(q.dtype) if fold_alpha else q, k, v

    attention.positioned_heads = format_one
    assert shift_changes_outputs(attention, encoding, x)
