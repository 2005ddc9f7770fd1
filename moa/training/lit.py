"""The LightningModule: wires the model, the objective, the optimiser and the logging.

It takes plain config dicts (not built modules) and builds the model and the objective
(moa/training/objectives/: the loss of each training stage) itself, so
`save_hyperparameters` records everything needed to rebuild it from a checkpoint.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.aggregation import MeanMetric

from moa.config import ModelConfig, OptimConfig
from moa.errors import TrainingStopped
from moa.layers.auxiliary import statistics_recorded
from moa.models.language_model import build_model
from moa.models.weights_format import WEIGHTS_FORMAT
from moa.schema import parse
from moa.training.objectives import OBJECTIVES, ConversationScores
from moa.training.optim import build_optimizer, clips_under_mixed_precision


class LanguageModelModule(pl.LightningModule):
    def __init__(self, model: dict[str, Any], optim: dict[str, Any],
                 objective: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig.from_dict(model)
        self.optim_config = parse(OptimConfig, optim, "optim")
        self.model = build_model(self.model_config)
        if self.model_config.compile:
            self.model.compile()  # in place: the state dict keeps its keys (no `_orig_mod.`)
        objective_config = OBJECTIVES.parse(objective or {"name": "lm"}, "objective")
        self.objective = OBJECTIVES.build(objective_config)
        self.objective.check_model(self.model)
        self.eval_metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MeanMetric()
            for stage in ("val", "test") for name in self.objective.metric_names
        })
        self.conversation_scores = {"val": ConversationScores(), "test": ConversationScores()}
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self._nonfinite_in_a_row = 0
        self._loss_finite = torch.tensor(True)

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids)

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.objective.on_train_step_start(self.model, self.global_step / total)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # the model's stats only for a step whose logs Lightning writes (the same test as
        # its LearningRateMonitor's): the others would compute them for nothing
        with statistics_recorded(self.trainer._logger_connector.should_update_logs):
            output = self.objective.training_step(self.model, batch, self.global_step)
        self.log_dict({f"train/{name}": value for name, value in output.logs.items()
                       if name in output.progress_bar}, prog_bar=True)
        self.log_dict({f"train/{name}": value for name, value in output.logs.items()
                       if name not in output.progress_bar})
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        self._loss_finite = output.loss.detach().isfinite()
        return output.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip a step whose loss or gradient is not finite: its gradients are dropped, so the
        optimizer leaves the weights as they were (and no checkpoint ever holds NaN weights).
        `optim.nonfinite_patience` such steps in a row stop the run."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        largest = torch.nn.utils.get_total_norm(grads, float("inf"), foreach=True)  # nan, inf
        if bool(self._loss_finite.to(self.device) & largest.to(self.device).isfinite()):
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

    def _evaluation_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                         stage: str) -> None:
        values = self.objective.evaluation_step(self.model, batch, batch_idx,
                                                self.conversation_scores[stage])
        # weighted means (tokens, mostly), so the epoch value is that of the whole split
        for name, (value, weight) in values.items():
            self.eval_metrics[f"{stage}_{name}"].update(value, weight)

    def _log_evaluation(self, stage: str) -> None:
        values = {}
        for name in self.objective.metric_names:
            values[f"{stage}/{name}"] = self.eval_metrics[f"{stage}_{name}"].compute()
            self.eval_metrics[f"{stage}_{name}"].reset()
        if self.objective.perplexity:
            values[f"{stage}/ppl"] = values[f"{stage}/loss"].exp()
        scores = self.conversation_scores[stage]
        for table, by_key in scores.results().items():
            values |= {f"{stage}/{table}/{key}": value for key, value in by_key.items()}
        scores.reset()
        shown = {f"{stage}/{name}" for name in ("loss", "ppl", "acc")} if stage == "val" else set()
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True,
                      sync_dist=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown}, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def configure_optimizers(self):
        trainer = self.trainer
        optimizer, scheduler = build_optimizer(
            self.model, self.optim_config, int(trainer.estimated_stepping_batches),
            clips_under_mixed_precision(trainer.precision, trainer.gradient_clip_val),
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
