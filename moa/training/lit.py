"""The LightningModule: wires the model, the loss, the optimiser and the logging.

It takes plain config dicts (not built modules) and builds the model itself, so
`save_hyperparameters` records everything needed to rebuild it from a checkpoint.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric

from moa.config import ModelConfig, OptimConfig
from moa.errors import TrainingStopped
from moa.models.language_model import ModelOutput, build_model
from moa.models.weights_format import WEIGHTS_FORMAT
from moa.schema import parse
from moa.training.optim import build_optimizer

IGNORE_INDEX = -100  # labels that carry no loss (mqar's non-answer positions)


def scored_forward(model: torch.nn.Module,
                   batch: dict[str, torch.Tensor]) -> tuple[ModelOutput, torch.Tensor]:
    """The model's output and the labels it is scored on. With `scored_positions` (B, K) in
    the batch (mqar), logits and labels are those positions' only: (B, K, V), (B, K)."""
    positions = batch.get("scored_positions")
    output = model(batch["input_ids"], output_positions=positions)
    labels = batch["labels"] if positions is None else batch["labels"].gather(1, positions)
    return output, labels


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean cross-entropy, accuracy and number of labelled tokens. (B, T, V), (B, T)."""
    mask = labels != IGNORE_INDEX
    count = mask.sum()
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX)
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss, correct.float() / count.clamp(min=1), count


class LanguageModelModule(pl.LightningModule):
    def __init__(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig.from_dict(model)
        self.optim_config = parse(OptimConfig, optim, "optim")
        self.model = build_model(self.model_config)
        if self.model_config.compile:
            self.model.compile()  # in place: the state dict keeps its keys (no `_orig_mod.`)
        self.eval_metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MeanMetric()
            for stage in ("val", "test") for name in ("loss", "acc")
        })
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self._nonfinite_in_a_row = 0
        self._loss_finite = torch.tensor(True)

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        output, labels = scored_forward(self.model, batch)
        loss, acc, _ = token_metrics(output.logits, labels)
        total = loss if output.aux_loss is None else loss + output.aux_loss
        self.log_dict({"train/loss": loss, "train/acc": acc, "train/ppl": loss.exp()},
                      prog_bar=True)
        for name, (value, _weight) in output.aux_losses.items():
            self.log(f"train/aux/{name}", value)
        for name, value in output.stats.items():
            self.log(f"train/stats/{name}", value)
        if output.aux_loss is not None:
            self.log("train/total_loss", total)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        self._loss_finite = total.detach().isfinite()
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip a step whose loss or gradient is not finite: its gradients are dropped, so the
        optimizer leaves the weights as they were (and no checkpoint ever holds NaN weights).
        `optim.nonfinite_patience` such steps in a row stop the run."""
        grads = [p.grad.isfinite().all() for p in self.parameters() if p.grad is not None]
        if bool(torch.stack([self._loss_finite.to(self.device), *grads]).all()):
            self._nonfinite_in_a_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._nonfinite_in_a_row += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        if self._nonfinite_in_a_row >= self.optim_config.nonfinite_patience:
            saved = [c.last_model_path for c in self.trainer.checkpoint_callbacks
                     if getattr(c, "last_model_path", "")]
            raise TrainingStopped(
                f"{self._nonfinite_in_a_row} non-finite steps in a row at step "
                f"{self.trainer.global_step}; last good checkpoint: "
                f"{saved[0] if saved else 'none saved yet'}")

    def _evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        output, labels = scored_forward(self.model, batch)
        loss, acc, count = token_metrics(output.logits, labels)
        # token-weighted means, so the epoch value is the per-token loss of the whole split
        self.eval_metrics[f"{stage}_loss"].update(loss, count)
        self.eval_metrics[f"{stage}_acc"].update(acc, count)

    def _log_evaluation(self, stage: str) -> None:
        loss = self.eval_metrics[f"{stage}_loss"].compute()
        acc = self.eval_metrics[f"{stage}_acc"].compute()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/ppl": loss.exp(), f"{stage}/acc": acc},
                      prog_bar=stage == "val", sync_dist=True)
        self.eval_metrics[f"{stage}_loss"].reset()
        self.eval_metrics[f"{stage}_acc"].reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(
            self.model, self.optim_config, int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moa_format_version"] = WEIGHTS_FORMAT
        checkpoint["model_config"] = self.model_config.to_dict()
        # Lightning does not save the global RNGs: dropout after a resume needs them
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all()}
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        states = checkpoint.get("rng_states")
        if states is not None:
            torch.set_rng_state(states["torch"])
            if torch.cuda.is_available() and states["cuda"]:
                torch.cuda.set_rng_state_all(states["cuda"])
