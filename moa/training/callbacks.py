"""Callbacks that Hydra instantiates from `conf/callbacks/`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_warn

from moa.config import ModelConfig
from moa.models.language_model import build_model


def _batch_size(batch: dict[str, Any]) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict[str, Any]) -> int:
    return batch["input_ids"].numel()


def training_flops(config: ModelConfig, batch_shape: tuple[int, int],
                   outputs_per_sequence: int | None = None) -> int | None:
    """FLOPs of one forward + backward on a (B, T) batch, counted on a meta-device copy;
    with `outputs_per_sequence` K, of the forward that wants K positions of each sequence
    (a batch's (B, K) `scored_positions`, as training runs it). None for a model whose work
    depends on the data (top-k routing picks tokens with `nonzero` and tests `.any()`,
    which the meta device cannot run)."""
    with torch.device("meta"):
        model = build_model(config)
        input_ids = torch.zeros(batch_shape, dtype=torch.long)
        wanted = None if outputs_per_sequence is None else torch.zeros(
            batch_shape[0], outputs_per_sequence, dtype=torch.long)
    try:
        return measure_flops(model, lambda: model(input_ids, output_positions=wanted).logits,
                             lambda out: out.sum())
    except (NotImplementedError, RuntimeError):
        return None


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: logs `train|items_per_sec` (tokens/s)
    and `train|device|flops_per_sec`, the FLOPs measured once from the first batch's shape
    (tokens/s only for a model without a static FLOP count: see `training_flops`)."""

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens,
                         window_size=window_size, separator="|")
        self._counted = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: dict[str, Any], batch_idx: int) -> None:
        if self._counted:
            return
        self._counted = True
        shape = tuple(batch["input_ids"].shape)
        scored = batch.get("scored_positions")
        pl_module.flops_per_batch = training_flops(
            pl_module.model_config, shape, None if scored is None else scored.size(1))
        if pl_module.flops_per_batch is None:
            rank_zero_warn("this model's work depends on its data: logging tokens/s, no FLOPs")
