"""Ball pruning in the metric-attention module: the radius's straight-through gradient,
the recorded pruned fraction, the kept-fraction target and its average under DDP. (The
kernels' exactness with balls: test_metric_kernels.py; the ball-aware cache:
test_kv_cache.py.)"""

from __future__ import annotations

import pytest
import torch

from moa.attention import ATTENTION
from moa.attention.balls import BallPruning
from moa.kernels.metric_reference import metric_attention_eager
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.kv_cache import LayerCache
from tests.conftest import forward_context, metric_heads_reference, metric_model_config


def test_radius_gradient_is_the_straight_through_derivative():
    """d loss / d log r is non-zero and is the chain rule through the surrogate gate: each
    key's gate gradient (the reference's, its would-be probability capped at 1:
    test_metric_kernels.py) times the finite-difference
    derivative of soft(r) at r0 (the estimator hard(r0) + soft(r) - soft(r0))."""
    torch.manual_seed(3)
    config = metric_model_config(use_balls=True, ball_band=0.5)
    attention = ATTENTION.build(config.attention, config).double()
    q = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    k = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    v = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    alpha = torch.full((4,), 0.05, dtype=torch.float64)
    balls = attention.balls
    distance = (k - balls.origin[None, :, None].detach()).norm(dim=-1)  # (B, H, S)
    with torch.no_grad():  # radius at the median distance: keys on both sides of the sphere
        balls.log_radius.copy_(distance.transpose(0, 1).flatten(1).median(1).values.log())
    weights = torch.randn(2, 4, 16, 8, dtype=torch.float64)

    def loss(gate):
        return (metric_attention_eager(q, k, v, k.pow(2).sum(-1), alpha, gate) * weights).sum()

    grad = torch.autograd.grad(loss(balls(k).gate), balls.log_radius)[0]
    log_r0 = balls.log_radius.detach().clone()
    hard = (distance <= log_r0.exp().view(1, -1, 1)).double().requires_grad_()
    gate_grad = torch.autograd.grad(loss(hard), hard)[0]  # (B, H, S)

    def surrogate(log_r):
        r = log_r.exp().view(1, -1, 1)
        return (0.5 + (r - distance) / (balls.band * r)).clamp(0, 1)

    eps = 1e-6
    for h in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[h] = eps
        slope = (surrogate(log_r0 + step) - surrogate(log_r0 - step)) / (2 * eps)
        torch.testing.assert_close(grad[h], (gate_grad * slope).sum(), rtol=1e-6, atol=1e-10)
    assert (grad != 0).all()


def test_generation_records_no_pruned_fraction_but_evaluation_does():
    """A cached forward outside training (a prefill or a decoding step: generation, whose
    stats nobody reads) skips the pruned fraction; an uncached evaluation and a cached
    training forward record it."""
    torch.manual_seed(4)
    config = metric_model_config("cpu_fused", use_balls=True, radius_init=0.3)
    attention = ATTENTION.build(config.attention, config).eval()
    x = torch.randn(2, 10, config.d_model)
    recorded = {}
    for label, training, cache in (("generation", False, LayerCache(16)),
                                   ("evaluation", False, None),
                                   ("training", True, LayerCache(16))):
        record = AuxiliaryRecorder()
        with torch.no_grad():
            attention.train(training)(x, forward_context(config, 10, record).replace(cache=cache))
        recorded[label] = "pruned_fraction" in record.stats
    assert recorded == {"generation": False, "evaluation": True, "training": True}


def test_pruned_fraction_and_ti_penalty_are_recorded():
    torch.manual_seed(4)
    config = metric_model_config("cpu_fused", use_balls=True, radius_init=0.3, ti_reg_weight=0.5,
                            ti_reg_samples=32)
    attention = ATTENTION.build(config.attention, config).train()
    record = AuxiliaryRecorder()
    x = torch.randn(2, 10, config.d_model)
    attention(x, forward_context(config, 10, record))
    q, k, _ = metric_heads_reference(attention, x, forward_context(config, 10))
    outside = (k - attention.balls.origin[None, :, None]).norm(dim=-1) > attention.balls.radius[
        None, :, None]
    torch.testing.assert_close(record.stats["pruned_fraction"], outside.float().mean())
    value, weight = record.losses["ti_penalty"]
    assert weight == 0.5 and value.requires_grad
    assert record.stats["ti_violating_fraction"] == 0.0  # a true metric obeys the inequality


def test_ball_target_moves_the_kept_fraction_to_the_target_and_the_loss_still_trains_it():
    """Balls that keep every key (radius 8, far outside the surrogate's band) keep about the
    target's 0.3 after a few training steps on random data (each closing half the gap), and
    the loss's straight-through gradient still reaches the radius once keys sit near it."""
    torch.manual_seed(8)
    config = metric_model_config("cpu_fused", use_balls=True, radius_init=8.0, n_kv_heads=2,
                            origin_init_scale=0.5, ball_target_kept=0.3, ball_target_rate=0.5)
    attention = ATTENTION.build(config.attention, config).train()
    optimiser = torch.optim.Adam(attention.parameters(), lr=1e-3)
    kept = []
    for _ in range(8):
        record = AuxiliaryRecorder()
        y = attention(torch.randn(4, 16, config.d_model), forward_context(config, 16, record))
        y.pow(2).mean().backward()
        optimiser.step()
        optimiser.zero_grad()
        kept.append(1.0 - float(record.stats["pruned_fraction"]))
        gap = float(record.stats["ball_target_log_radius_gap"])
    assert kept[0] == 1.0 and abs(kept[-1] - 0.3) < 0.1, kept
    assert abs(gap) < 0.1
    y = attention(torch.randn(4, 16, config.d_model), forward_context(config, 16))
    y.pow(2).mean().backward()
    assert (attention.balls.log_radius.grad != 0).all()
    attention.eval()  # inference leaves the radii alone
    radius = attention.balls.log_radius.detach().clone()
    attention(torch.randn(4, 16, config.d_model), forward_context(config, 16))
    assert torch.equal(attention.balls.log_radius, radius)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_ball_target_under_a_process_group_moves_the_radii_as_without(tmp_path):
    """Under DDP the target is averaged over the processes (`all_reduce`, then divided by
    the world size); in a one-process gloo group that is the process's own target, so the
    radii move exactly as without a group."""
    from torch import distributed

    torch.manual_seed(16)
    config = metric_model_config("cpu_fused", use_balls=True, radius_init=8.0,
                            ball_target_kept=0.3, ball_target_rate=0.5)
    alone = ATTENTION.build(config.attention, config).train()
    grouped = ATTENTION.build(config.attention, config).train()
    grouped.load_state_dict(alone.state_dict())
    x = torch.randn(2, 12, config.d_model)
    alone(x, forward_context(config, 12))
    distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                   rank=0, world_size=1)
    try:
        grouped(x, forward_context(config, 12))
    finally:
        distributed.destroy_process_group()
    assert (alone.balls.log_radius != torch.tensor(8.0).log()).all()  # the target moved them
    torch.testing.assert_close(grouped.balls.log_radius, alone.balls.log_radius, rtol=0, atol=0)


def test_without_gradients_the_ball_gives_its_hard_mask_alone():
    """Inference (no gradient wanted) skips the surrogate: the same gate values and pruned
    fraction as with gradients, and no band, which only says where a gradient flows."""
    balls = BallPruning(2, 8, radius_init=2.5, learn_radius=True, origin_init_scale=0.3,
                        band=0.5)
    k = torch.randn(2, 2, 19, 8)
    with torch.no_grad():
        inference = balls(k)
    training = balls(k)
    assert inference.band is None and training.band is not None and training.band.any()
    assert 0 < inference.pruned_fraction() < 1
    torch.testing.assert_close(inference.gate, training.gate.detach(), rtol=0, atol=0)
    torch.testing.assert_close(inference.pruned_fraction(), training.pruned_fraction())
