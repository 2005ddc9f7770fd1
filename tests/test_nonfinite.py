"""A non-finite loss or gradient skips the step; `optim.nonfinite_patience` in a row stop the
run with an error naming the last good checkpoint, which keeps finite weights."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from moa.errors import TrainingStopped
from moa.training import train
from moa.training.lit import LanguageModelModule
from moa.training.run_status import read_status
from tests.conftest import tiny_model_config

RUN = ("trainer=smoke", "model=gpt", "tokenizer=byte", "evaluate=false", "model.n_layers=1",
       "data.batch_size=8", "trainer.log_every_n_steps=1", "optim.nonfinite_patience=3")


def poison_steps(monkeypatch, steps: set[int]) -> list[dict[str, torch.Tensor]]:
    """Make the loss NaN at these global steps; returns the weights seen at every step."""
    original = LanguageModelModule.training_step
    seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in steps else loss

    monkeypatch.setattr(LanguageModelModule, "training_step", training_step)
    return seen


def last_logged(run_dir: Path, key: str) -> float:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)][-1]


def test_nonfinite_steps_are_skipped_and_counted(compose_config, tmp_path, monkeypatch):
    seen = poison_steps(monkeypatch, {2, 3})
    _, objects = train(compose_config(*RUN, "trainer.max_steps=6",
                                      "trainer.val_check_interval=6"))
    assert objects["module"].skipped_steps == 2
    assert last_logged(tmp_path / "run", "train/skipped_steps") == 2
    for name, weight in seen[2].items():  # the weights before the poisoned steps...
        assert torch.equal(seen[4][name], weight)  # ...are the weights after them
    assert any(not torch.equal(seen[5][name], seen[4][name]) for name in seen[4])  # then it learns
    assert all(v.isfinite().all() for v in objects["module"].state_dict().values())


def test_nonfinite_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(
        compose_config, tmp_path, monkeypatch):
    poison_steps(monkeypatch, set(range(4, 100)))
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"^3 non-finite steps in a row at step 6; "
                                              r"last good checkpoint: .*last\.ckpt$"):
        train(compose_config(*RUN, "trainer.max_steps=20", "trainer.val_check_interval=20"))
    assert read_status(run)["status"] == "failed"
    assert "3 non-finite steps in a row" in read_status(run)["error"]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5 and saved["skipped_steps"] == 1
    assert all(v.isfinite().all() for v in saved["state_dict"].values())



@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_one_nonfinite_gradient_value_skips_the_step(bad):
    """A finite loss, and one value of one parameter's gradient not finite: the step's
    gradients are dropped; all finite, they are kept."""
    module = LanguageModelModule(tiny_model_config().to_dict(), {})
    module.log = lambda *args, **kwargs: None
    optimizer = torch.optim.AdamW(module.parameters())
    parameters = list(module.parameters())
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, 3e38)  # large, finite
    module.on_before_optimizer_step(optimizer)
    assert all(p.grad is not None for p in parameters) and module.skipped_steps == 0
    parameters[len(parameters) // 2].grad.view(-1)[-1] = bad
    module.on_before_optimizer_step(optimizer)
    assert all(p.grad is None for p in parameters) and module.skipped_steps == 1
