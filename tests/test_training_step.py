"""The LightningModule's training step: each auxiliary loss reaches the parameters it
regularises through the returned objective, with the weight it was recorded with."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from moa.attention import metric as metric_module
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.regularizers import triangle_inequality_penalty
from moa.training.lit import LanguageModelModule
from moa.training.objectives import token_metrics
from tests.conftest import tiny_model_config

WEIGHTS = {"mse_uniform": 0.3, "switch": 0.2, "z_loss": 0.1, "ti_penalty": 0.5}


def _module() -> LanguageModelModule:
    """A mixture of a metric path (TI penalty) and a dot-product path under a softmax router
    with both balance losses and the z-loss, outside a Trainer (its logging stubbed)."""
    router = {"name": "softmax", "router_hidden": 8, "mse_uniform_weight": WEIGHTS["mse_uniform"],
              "switch_weight": WEIGHTS["switch"], "z_loss_weight": WEIGHTS["z_loss"]}
    paths = [{"name": "metric", "impl": "eager", "metric": {"name": "maha_diag"},
              "alpha_init": 0.5, "ti_reg_weight": WEIGHTS["ti_penalty"], "ti_reg_samples": 16},
             {"name": "dot_product", "n_kv_heads": 2}]
    config = tiny_model_config({"name": "mixture", "paths": paths, "router": router})
    module = LanguageModelModule(config.to_dict(), {})
    module.log = module.log_dict = lambda *args, **kwargs: None
    optimiser = SimpleNamespace(param_groups=[{"lr": 1e-3}])
    module._trainer = SimpleNamespace(optimizers=[optimiser], global_step=0,
                                      _logger_connector=SimpleNamespace(should_update_logs=True))
    return module


def _squared_distance_penalty(points: torch.Tensor, n_samples: int):
    """The TI penalty over squared distances, which break the inequality (under the true
    metrics the penalty is zero, and so is its gradient)."""
    return triangle_inequality_penalty(points, n_samples, lambda a, b: (a - b).pow(2).sum(-1))


def test_each_auxiliary_loss_reaches_its_parameters_through_the_training_step(monkeypatch):
    """d(returned objective)/dp = d(cross-entropy)/dp + sum_i w_i d(aux_i)/dp for the router's
    and the metric path's parameters, and each w_i d(aux_i)/dp is non-zero somewhere: a
    training step that dropped a loss, or its weight, fails here."""
    monkeypatch.setattr(metric_module, "triangle_inequality_penalty", _squared_distance_penalty)
    torch.manual_seed(0)
    module = _module().train()
    ids = torch.randint(0, 50, (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    router = module.model.blocks[0].attention.router
    metric = module.model.blocks[0].attention.paths[0]
    router_params = list(router.parameters())
    metric_params = [metric.log_alpha, metric.log_maha, *metric.heads.parameters()]
    params = router_params + metric_params
    regularised = {"mse_uniform": router_params, "switch": router_params,
                   "z_loss": router_params, "ti_penalty": metric_params[1:]}

    def grads(value: torch.Tensor) -> list[torch.Tensor]:
        found = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]

    torch.manual_seed(1)  # the TI penalty samples its triples: the same ones both times
    got = grads(module.training_step(batch, 0))

    torch.manual_seed(1)
    output = module.model(batch["input_ids"])
    want = grads(token_metrics(output.logits, batch["labels"])[0])
    seen = set()
    for scoped, (value, weight) in output.aux_losses.items():
        name = scoped.rsplit(".", 1)[-1]
        seen.add(name)
        assert weight == WEIGHTS[name]
        part = grads(weight * value)
        reached = {id(p) for p, g in zip(params, part, strict=True) if g.abs().sum() > 0}
        assert {id(p) for p in regularised[name]} & reached, f"{scoped}: no gradient"
        want = [w + g for w, g in zip(want, part, strict=True)]
    assert seen == set(WEIGHTS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_the_recorder_scopes_names_detaches_stats_and_sums_weighted_losses():
    """Scoped views write into one store under `prefix.name.`; a stat is detached (a
    tensor's without a copy or a warning, a float's as a tensor); the total is
    sum w_i * value_i, None when nothing was recorded."""
    record = AuxiliaryRecorder()
    assert record.total_loss() is None
    layer = record.scoped("layers").scoped("0")
    value = torch.tensor(2.0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.stat("norm", value * 3)
    layer.stat("fraction", 0.25)
    layer.loss("z_loss", value, 0.5)
    record.loss("switch", value * value, 2)
    assert set(record.stats) == {"layers.0.norm", "layers.0.fraction"}
    assert set(record.losses) == {"layers.0.z_loss", "switch"}
    assert not record.stats["layers.0.norm"].requires_grad
    assert record.stats["layers.0.norm"].item() == 6.0
    assert torch.equal(record.stats["layers.0.fraction"], torch.tensor(0.25))
    total = record.total_loss()
    assert total.item() == 0.5 * 2.0 + 2 * 4.0
    total.backward()
    assert value.grad.item() == 0.5 + 2 * 2 * 2.0
