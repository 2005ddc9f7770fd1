"""Callbacks that Hydra instantiates from `conf/callbacks/`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import RichModelSummary, ThroughputMonitor
from lightning.pytorch.utilities.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)
from torch.utils.flop_counter import (
    FlopCounterMode,
    bmm_flop,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from moa.config import ModelConfig
from moa.models.language_model import LanguageModel, build_model
from moa.training.job_log import job_file_log

RIGHT_ALIGNED = {"Params", "Params per Device", "In sizes", "Out sizes"}


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
    which the meta device cannot run), and for the Reactive Transformer, whose step is its
    objective's (a stage runs the encoder, the decoder or both, once a turn)."""
    with torch.device("meta"):
        model = build_model(config)
    if not isinstance(model, LanguageModel):
        return None
    with torch.device("meta"):
        input_ids = torch.zeros(batch_shape, dtype=torch.long)
        wanted = None if outputs_per_sequence is None else torch.zeros(
            batch_shape[0], outputs_per_sequence, dtype=torch.long)
    try:
        return measure_flops(model, lambda: model(input_ids, output_positions=wanted).logits,
                             lambda out: out.sum())
    except (NotImplementedError, RuntimeError):
        return None


def batch_flops(step: Callable[[], object]) -> int:
    """FLOPs of the matrix products and attention that `step()` runs on its real tensors:
    for a model whose work depends on the data (top-k routing), a count of what one batch
    ran. Counted as `training_flops` counts (`_count_cpu_attention`)."""
    _count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None,
                            **kwargs) -> int:
    """Without the scores the kernel recomputes: the products of attention's gradient."""
    b, heads, queries, width = query
    recomputed = bmm_flop((b * heads, queries, width), (b * heads, width, key[2]))
    return sdpa_backward_flop_count(grad_out, query, key, value) - recomputed


@functools.cache
def _count_cpu_attention() -> None:
    """Teach torch's FLOP counter PyTorch's CPU flash attention (it knows the CUDA
    kernels): two products forward and four backward, as the meta device's decomposition
    of attention counts them in `training_flops`."""
    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, _cpu_attention),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                         _cpu_attention_backward)):
        if op not in flop_registry:
            register_flop_formula(op)(formula)


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
        if pl_module.flops_per_batch is None and trainer.is_global_zero:
            job_file_log().info("FLOPs not counted: this model's work depends on its data "
                                "(top-k routing, ball pruning) or its objective (the Reactive "
                                "Transformer); tokens/s are logged, FLOPs/s are not")


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary (layers, parameter counts, size, modes) without its
    FLOPs: it counts them only on a module's `example_input_array`, which ours has not,
    and printed a FLOPs column of zeros and "Total FLOPs: 0". The FLOPs of a training step
    are TokenThroughput's."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int,
                  trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in RIGHT_ALIGNED else "left",
                             style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (
                ("Trainable params", get_human_readable_count(int(trainable_parameters))),
                ("Non-trainable params",
                 get_human_readable_count(int(total_parameters - trainable_parameters))),
                ("Total params", get_human_readable_count(int(total_parameters))),
                ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                ("Modules in train mode", total_training_modes["train"]),
                ("Modules in eval mode", total_training_modes["eval"])):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
