"""Callbacks that Hydra instantiates from `conf/callbacks/`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor

from moa.config import ModelConfig
from moa.model import build_model


def _batch_size(batch: dict[str, Any]) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict[str, Any]) -> int:
    return batch["input_ids"].numel()


def training_flops(config: ModelConfig, batch_shape: tuple[int, int]) -> int:
    """FLOPs of one forward + backward on a (B, T) batch, counted on a meta-device copy."""
    with torch.device("meta"):
        model = build_model(config)
        input_ids = torch.zeros(batch_shape, dtype=torch.long)
    return measure_flops(model, lambda: model(input_ids).logits, lambda logits: logits.sum())


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: logs `train|items_per_sec` (tokens/s)
    and `train|device|flops_per_sec`, the FLOPs measured once from the first batch's shape."""

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens,
                         window_size=window_size, separator="|")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: dict[str, Any], batch_idx: int) -> None:
        if getattr(pl_module, "flops_per_batch", None) is None:
            shape = tuple(batch["input_ids"].shape)
            pl_module.flops_per_batch = training_flops(pl_module.model_config, shape)
