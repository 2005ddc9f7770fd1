"""Metric attention's bidirectional (encoder) path: the reference fed by hand with the
metric map, rotation and value gate; the triangle-inequality penalty over its own keys;
outputs at output positions."""

from __future__ import annotations

import pytest
import torch

from moa.attention import ATTENTION
from moa.kernels.metric_reference import metric_attention_eager
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.context import ForwardContext
from tests.conftest import forward_context, metric_model_config, tiny_model_config


def _encoder_context(config, T: int, record: AuxiliaryRecorder | None = None, **fields
                     ) -> ForwardContext:
    """A context where every query sees every key (an encoder's), positions 0..T-1."""
    return forward_context(config, T, record).replace(causal=False, **fields)


def test_encoder_attention_rotates_and_gates_at_its_positions():
    """The bidirectional path against the reference fed by hand: q and k mapped to the
    metric space and rotated, values gated by blackhole_rope's (perturbed) energy gate at
    their positions, masked keys dropped."""
    torch.manual_seed(9)
    config = tiny_model_config({"name": "metric", "impl": "cpu_fused", "n_kv_heads": 2,
                                "key_norm": "free", "metric": {"name": "maha_diag"}},
                               position="blackhole_rope")
    attention = ATTENTION.build(config.attention, config).double()
    with torch.no_grad():
        attention.log_maha.normal_()
    x = torch.randn(2, 9, config.d_model, dtype=torch.float64)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, :3] = False
    ctx = _encoder_context(config, 9, key_mask=key_mask)
    ctx.position.double()
    with torch.no_grad():
        ctx.position.energy_coefficients.normal_()
    q = attention.queries_to_metric_space(attention.heads.queries(x))
    k, v = attention.heads.keys_values(x)
    q, k = ctx.position.rotate(q, attention.keys_to_metric_space(k), ctx.positions)
    v = v * ctx.position.energy_gate(ctx.positions)  # (B, Hkv, T, D) * (T, D)
    expected = metric_attention_eager(q, k, v, k.pow(2).sum(-1), attention.log_alpha.exp(),
                                      None, causal=False, key_mask=key_mask)
    torch.testing.assert_close(attention(x, ctx), attention.heads.merge(expected))


@pytest.mark.parametrize(("weight", "memory", "training", "recorded"), [
    (0.5, False, True, True), (0.0, False, True, False), (0.5, True, True, False),
    (0.5, False, False, False)])
def test_encoder_ti_penalty_only_in_training_over_its_own_keys(weight, memory, training,
                                                               recorded):
    """The triangle-inequality penalty of an encoder's queries and keys: recorded with its
    weight when training with a positive weight; never for a memory read."""
    torch.manual_seed(11)
    config = metric_model_config("cpu_fused", n_kv_heads=2, ti_reg_weight=weight,
                            ti_reg_samples=32)
    attention = ATTENTION.build(config.attention, config).train(training)
    record = AuxiliaryRecorder()
    source = torch.randn(2, 5, config.d_model) if memory else None
    attention(torch.randn(2, 6, config.d_model), _encoder_context(config, 6, record,
                                                                  memory=source))
    assert ("ti_penalty" in record.losses) == recorded
    if recorded:
        value, given = record.losses["ti_penalty"]
        assert given == weight and value.requires_grad
        assert record.stats["ti_violating_fraction"] == 0.0  # L2 obeys the inequality


def test_encoder_outputs_at_output_positions_are_the_full_outputs_there():
    torch.manual_seed(12)
    config = metric_model_config("cpu_fused")
    attention = ATTENTION.build(config.attention, config).double()
    x = torch.randn(2, 7, config.d_model, dtype=torch.float64)
    wanted = torch.tensor([[0, 4, 6], [5, 1, 1]])  # (B, K)
    full = attention(x, _encoder_context(config, 7))
    some = attention(x, _encoder_context(config, 7, output_positions=wanted))
    torch.testing.assert_close(some, torch.stack([full[b, wanted[b]] for b in range(2)]))
