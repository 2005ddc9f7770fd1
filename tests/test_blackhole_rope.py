"""BlackHoleRoPE: a rotation against a complex-number reference, unitary and relative; the
value gate bounded; causal and cached == uncached in the model; gradients; a smoke train."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from moa.errors import ConfigError
from moa.layers.position import (
    POSITION,
    BlackHoleRoPE,
    BlackHoleRoPEConfig,
    RotaryConfig,
    RotaryPosition,
    fourier_features,
)
from moa.models.language_model import build_model
from tests.conftest import tiny_model_config

D, L = 16, 64


def perturbed(scale: float = 1.0, **config) -> BlackHoleRoPE:
    """A BlackHoleRoPE with random, non-zero perturbation and gate coefficients."""
    torch.manual_seed(0)
    rope = BlackHoleRoPE(BlackHoleRoPEConfig(**config), max_seq_len=L, d_model=4 * D, head_dim=D)
    with torch.no_grad():
        rope.phase_coefficients.normal_(0, scale)
        rope.energy_coefficients.normal_(0, scale)
    return rope


def reference_rotation(rope: BlackHoleRoPE, x: torch.Tensor, positions: torch.Tensor
                       ) -> torch.Tensor:
    """The docstring's formula in float64, as a complex multiplication of the pairs."""
    a = rope.phase_coefficients.detach().double()
    pairs = (torch.arange(D // 2, dtype=torch.float64) + 0.5) / (D // 2)
    omega = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    omega = omega * 2 ** torch.tanh(fourier_features(pairs, rope.r_basis) @ a)
    phase = positions.double()[:, None] * omega  # (T, D/2)
    x1, x2 = x.double().chunk(2, dim=-1)
    z = torch.complex(x1, x2) * torch.polar(torch.ones_like(phase), phase)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rotation_matches_the_reference_formula():
    rope = perturbed()
    q, k = torch.randn(2, 3, 10, D), torch.randn(2, 3, 10, D)
    positions = torch.arange(50, 60)
    q_rot, k_rot = rope.rotate(q, k, positions)
    torch.testing.assert_close(q_rot.double(), reference_rotation(rope, q, positions),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_rot.double(), reference_rotation(rope, k, positions),
                               atol=1e-4, rtol=1e-4)


def test_tables_kept_without_autograd_follow_the_positions_and_the_parameters():
    """Without autograd the angles and the value gate are computed once per positions
    tensor (every layer of a forward shares it), and recomputed for new positions or after
    the parameters change in place (an optimizer step)."""
    rope = perturbed()
    q, k, v = torch.randn(1, 2, 10, D), torch.randn(1, 2, 10, D), torch.randn(1, 2, 10, D)
    positions = torch.arange(50, 60)

    def encoded(at: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*rope.rotate(q, k, at), rope.scale_values(v, at))

    later = torch.arange(60, 70)
    want_later = encoded(later)  # with autograd: never kept
    with torch.no_grad():
        first = encoded(positions)
        assert all(torch.equal(a, b) for a, b in zip(encoded(positions), first, strict=True))
        for got, want in zip(encoded(later), want_later, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        rope.phase_coefficients.add_(0.5)
        rope.energy_coefficients.mul_(-1.0)
        moved = encoded(positions)
    with torch.inference_mode():  # its tensors keep no version counter
        inferred = encoded(torch.arange(50, 60))
    for got, want in zip(moved, encoded(positions), strict=True):  # with autograd: uncached
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(inferred, moved, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not any(torch.allclose(a, b) for a, b in zip(moved, first, strict=True))


def test_starts_as_rope_with_theta_base():
    rope = BlackHoleRoPE(BlackHoleRoPEConfig(theta_base=500.0), L, 4 * D, D)
    plain = RotaryPosition(RotaryConfig(theta=500.0), L, 4 * D, D)
    q, k, v = torch.randn(3, 1, 2, L, D).unbind(0)
    positions = torch.arange(L)
    for ours, theirs in zip(rope.rotate(q, k, positions), plain.rotate(q, k, positions),
                            strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope.scale_values(v, positions), v)


def test_perturbed_rotation_is_unitary_and_relative():
    rope = perturbed(scale=3.0)
    x = torch.randn(1, 4, L, D)
    rotated, _ = rope.rotate(x, x, torch.arange(L))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # per token and head
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(i: int, j: int) -> torch.Tensor:
        q_i, _ = rope.rotate(q, q, torch.tensor([i]))
        _, k_j = rope.rotate(k, k, torch.tensor([j]))
        return (q_i * k_j).sum()

    torch.testing.assert_close(score(10, 7), score(40, 37), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(10, 7), score(10, 8))


def test_value_gate_is_bounded_and_the_clamp_binds():
    rope = perturbed(scale=10.0, energy_amplification=3.0)  # 2^(+-3) before the clamp
    gate = rope.energy_gate(torch.arange(L))
    assert gate.shape == (L, D)
    assert gate.min() >= 0.5 and gate.max() <= 2.0
    assert gate.min() == 0.5 and gate.max() == 2.0
    v = torch.randn(2, 3, L, D)
    torch.testing.assert_close(rope.scale_values(v, torch.arange(L)), v * gate)


def test_value_gate_reaches_2_to_the_amplification_inside_the_bound():
    rope = perturbed(scale=10.0, energy_amplification=0.5)
    gate = rope.energy_gate(torch.arange(L))
    assert gate.max() <= math.sqrt(2) + 1e-6 and gate.min() >= 1 / math.sqrt(2) - 1e-6
    assert gate.max() > 1.3 and gate.min() < 0.77


def test_without_value_energy_the_values_pass_unchanged():
    rope = BlackHoleRoPE(BlackHoleRoPEConfig(enable_v_energy=False), L, 4 * D, D)
    assert rope.energy_coefficients is None
    assert [name for name, _ in rope.named_parameters()] == ["phase_coefficients"]
    v = torch.randn(1, 2, 5, D)
    assert rope.scale_values(v, torch.arange(5)) is v


@pytest.mark.parametrize("key, value", [("theta_base", 0.0), ("r_basis", 0),
                                        ("energy_amplification", -1.0)])
def test_bad_config_names_its_key(key, value):
    with pytest.raises(ConfigError, match=f"position.{key}"):
        POSITION.parse({"name": "blackhole_rope", key: value}, "position")


def blackhole_model(attention: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(tiny_model_config(attention, position="blackhole_rope")).eval()
    with torch.no_grad():  # away from the identity start, so the test sees the perturbation
        model.position.phase_coefficients.normal_(0, 1.0)
        model.position.energy_coefficients.normal_(0, 1.0)
    return model


ATTENTIONS = [{}, {"n_kv_heads": 2}, {"name": "metric"}, {"name": "metric", "n_kv_heads": 1}]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cached_forward_equals_full_forward(attention):
    model = blackhole_model(attention)
    ids = torch.randint(0, 50, (2, 21))
    full = model(ids).logits
    cache = model.new_cache()
    chunks = [model(ids[:, :8], cache).logits, model(ids[:, 8:9], cache).logits,
              model(ids[:, 9:], cache).logits]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal(attention):
    model = blackhole_model(attention)
    ids = torch.randint(0, 50, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 50
    torch.testing.assert_close(model(changed).logits[:, :12], model(ids).logits[:, :12])
    assert not torch.allclose(model(changed).logits[:, 12:], model(ids).logits[:, 12:])


@pytest.mark.parametrize("attention", [{}, {"name": "metric"}])
def test_gradients_reach_perturbation_and_gate(attention):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(attention, position="blackhole_rope"))
    logits = model(torch.randint(0, 50, (2, 16))).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                      torch.randint(0, 50, (32,))).backward()
    assert model.position.phase_coefficients.grad.abs().sum() > 0
    assert model.position.energy_coefficients.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", [{}, {"name": "metric", "n_kv_heads": 1}])
def test_a_forward_computes_the_tables_once_for_every_layer(attention, monkeypatch):
    """Within a model's forward, with autograd, the layers share the tables (angles, value
    gate) computed once from the positions; the logits and every gradient are those of
    a forward whose every layer computes its own, in float64. Two forwards share none:
    the tables, with their graph, are dropped when the forward ends."""
    torch.manual_seed(0)
    model = blackhole_model(attention).double().train()
    ids = torch.randint(0, 50, (2, 13))
    calls = []
    for name in ("angles", "energy_gate"):
        compute = getattr(model.position, name)
        monkeypatch.setattr(model.position, name,
                            lambda at, compute=compute, name=name: calls.append(name)
                            or compute(at))

    def logits_and_gradients():
        logits = model(ids).logits
        return (logits, *torch.autograd.grad(logits.square().sum(), list(model.parameters())))

    shared = logits_and_gradients()
    assert sorted(calls) == ["angles", "energy_gate"]
    assert not model.position._tables.values  # none outlives its forward, nor its graph
    again = logits_and_gradients()
    monkeypatch.setattr(model.position, "one_forward", contextlib.nullcontext)
    calls.clear()
    apart = logits_and_gradients()
    assert len(calls) == 2 * len(model.blocks)
    for got, repeated, want in zip(shared, again, apart, strict=True):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(repeated, got, rtol=0, atol=0)


def test_smoke_train(compose_config):
    from moa.training import train

    cfg = compose_config("trainer=smoke", "model=gpt", "position=blackhole_rope",
                         "evaluate=false", "tokenizer=byte", "trainer.max_steps=10")
    metrics, objects = train(cfg)
    rope = objects["module"].model.position
    assert isinstance(rope, BlackHoleRoPE)
    assert rope.phase_coefficients.abs().sum() > 0  # learned away from the rope start
    assert rope.energy_coefficients.abs().sum() > 0


def test_a_float64_model_runs_in_float64_and_agrees_with_float32():
    """The value gate's features follow the coefficients' dtype (they were float32 always,
    so a float64 model failed in its matmul)."""
    model = blackhole_model({})
    ids = torch.randint(0, 50, (2, 13))
    single = model(ids).logits
    double = model.double()(ids).logits
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", [{}, {"name": "metric", "n_kv_heads": 1}])
def test_a_compiled_forward_traces_whole_through_the_kept_tables(attention):
    """Under torch.compile the kept tables (and metric attention's alpha) compute every
    call: dynamo traces a training forward as one graph, with no break at their checks
    nor inside `one_forward` (a break there ran the rest of the forward uncompiled), and
    its logits are the eager forward's."""
    torch._dynamo.reset()
    model = blackhole_model(attention).train()
    ids = torch.randint(0, 50, (2, 13))
    explanation = torch._dynamo.explain(model)(ids)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
        explanation.break_reasons
    torch.testing.assert_close(torch.compile(model, backend="eager")(ids).logits,
                               model(ids).logits)
