"""Callbacks that Hydra instantiates from `conf/callbacks/`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_warn

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
    and `train|device|flops_per_sec`, the FLOPs measured once from the first batch's shape.

    A model whose work depends on the data (top-k routing picks tokens with `nonzero` and
    tests `.any()`, which the meta device cannot run) has no static FLOP count: it logs
    tokens/s only."""

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
        try:
            pl_module.flops_per_batch = training_flops(pl_module.model_config, shape)
        except (NotImplementedError, RuntimeError) as error:  # data-dependent ops on meta
            pl_module.flops_per_batch = None
            rank_zero_warn(f"no FLOP count for this model ({error}); logging tokens/s only")
