"""Callback factories that Hydra instantiates from `conf/callbacks/`."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def _batch_size(batch: dict[str, Any]) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict[str, Any]) -> int:
    return batch["input_ids"].numel()


def token_throughput(window_size: int = 10) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor counting tokens: logs train|items_per_sec (tokens/s)."""
    return ThroughputMonitor(batch_size_fn=_batch_size, length_fn=_tokens,
                             window_size=window_size, separator="|")
