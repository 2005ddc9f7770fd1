"""AdamW with decay only on matrices, and a linear-warmup cosine schedule.

`optim.impl` says how AdamW's step runs, not what it computes: `for_loop` (PyTorch's
reference: a dozen small ops per parameter tensor), `foreach` (the same ops, each over
the list of tensors) or `fused` (one kernel over them all; CPU and CUDA). A MoA model
holds several times a GPT's parameter tensors at the same width, and the for_loop step
costs by the tensor (`bench/optimizer.py`). `auto` is `fused` on CPU and CUDA, except
where Lightning cannot clip its gradients: under mixed precision (`16-mixed`,
`bf16-mixed`) Lightning refuses to clip the gradients of an optimizer that unscales them
in its step, which a fused one does; there `auto` is `foreach`, and `fused` with
`trainer.gradient_clip_val` > 0 is a config error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moa.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on Linear weights only: never on norms, biases or embeddings."""
    decay, no_decay = {}, {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            target = decay if isinstance(module, nn.Linear) and name == "weight" else no_decay
            target[id(param)] = param
    # a weight tied to an embedding is an embedding: keep it out of decay
    for param_id in set(decay) & set(no_decay):
        del decay[param_id]
    return [
        {"params": list(decay.values()), "weight_decay": weight_decay},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr at `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def clips_under_mixed_precision(precision: Any, gradient_clip_val: float | None) -> bool:
    """Whether Lightning clips gradients under mixed precision, where it refuses a fused
    optimizer (`precision` as the trainer takes it: `16-mixed`, `bf16-mixed`, 16, ...)."""
    mixed = str(precision) in ("16-mixed", "bf16-mixed", "16", "bf16")
    return mixed and bool(gradient_clip_val)


def step_keywords(impl: str, parameters: list[torch.Tensor], clips_mixed: bool) -> dict:
    """AdamW's `fused` and `foreach` for `impl` (`auto`: fused when every parameter is on
    CPU or CUDA and Lightning need not clip under mixed precision, else foreach)."""
    if impl == "auto":
        fusable = all(p.device.type in ("cpu", "cuda") for p in parameters)
        impl = "fused" if fusable and not clips_mixed else "foreach"
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def build_optimizer(model: nn.Module, config: OptimConfig, total_steps: int,
                    clips_mixed: bool = False):
    """AdamW (run as `config.impl` says) and its schedule; `clips_mixed`: the trainer
    clips gradients under mixed precision (`clips_under_mixed_precision`)."""
    groups = parameter_groups(model, config.weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
        **step_keywords(config.impl, parameters, clips_mixed),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, total_steps)
    )
    return optimizer, scheduler
