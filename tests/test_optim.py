"""AdamW's step implementations (`optim.impl`): the same update, chosen where Lightning allows."""

import pytest
import torch

from moa.config import OptimConfig
from moa.errors import ConfigError
from moa.models.language_model import build_model
from moa.training.optim import build_optimizer, clips_under_mixed_precision, step_keywords
from moa.training.run_config import parse_run
from tests.conftest import tiny_model_config

IMPLS = ("fused", "foreach", "for_loop")


def stepped_parameters(impl: str, steps: int = 3) -> dict[str, torch.Tensor]:
    """A tiny model's parameters after `steps` AdamW steps on fixed random gradients."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).double()
    optimizer, _ = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0, impl=impl), steps)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for parameter in model.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator,
                                         dtype=parameter.dtype)
        optimizer.step()
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_every_implementation_takes_the_same_steps():
    """float64, weight decay on the matrices only, bias corrections over three steps."""
    reference = stepped_parameters("for_loop")
    assert all(not torch.equal(reference[name], start) for name, start
               in stepped_parameters("for_loop", steps=0).items())  # every parameter moved
    for impl in ("fused", "foreach"):
        stepped = stepped_parameters(impl)
        for name, value in reference.items():
            torch.testing.assert_close(stepped[name], value, rtol=1e-12, atol=1e-12,
                                       msg=f"{impl}: {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_each_implementation_is_what_adamw_runs(impl):
    model = torch.nn.Linear(4, 4)
    optimizer, _ = build_optimizer(model, OptimConfig(impl=impl), 10)
    assert (bool(optimizer.defaults["fused"]), bool(optimizer.defaults["foreach"])) == {
        "fused": (True, False), "foreach": (False, True), "for_loop": (False, False)}[impl]


def test_auto_fuses_unless_lightning_clips_under_mixed_precision():
    parameters = [torch.zeros(2)]
    assert step_keywords("auto", parameters, clips_mixed=False) == {"fused": True,
                                                                    "foreach": False}
    assert step_keywords("auto", parameters, clips_mixed=True) == {"fused": False,
                                                                   "foreach": True}
    assert step_keywords("auto", [torch.zeros(2, device="meta")], False)["foreach"]
    assert clips_under_mixed_precision("bf16-mixed", 1.0)
    assert clips_under_mixed_precision("16-mixed", 0.5)
    assert not clips_under_mixed_precision("bf16-mixed", 0.0)
    assert not clips_under_mixed_precision("bf16-mixed", None)
    assert not clips_under_mixed_precision("32-true", 1.0)


def test_fused_with_clipping_under_mixed_precision_is_refused_before_training(compose_config):
    with pytest.raises(ConfigError) as error:
        parse_run(compose_config("optim.impl=fused", "trainer.precision=bf16-mixed",
                                 "trainer.gradient_clip_val=1.0"))
    assert error.value.key == "optim.impl" and "foreach" in str(error.value)
    parse_run(compose_config("optim.impl=fused", "trainer.precision=bf16-mixed",
                             "trainer.gradient_clip_val=0"))
    with pytest.raises(ConfigError) as error:
        parse_run(compose_config("optim.impl=fast"))
    assert error.value.key == "optim.impl"
