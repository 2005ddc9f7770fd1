"""AdamW with decay only on matrices, and a linear-warmup cosine schedule."""

from __future__ import annotations

import math

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


def build_optimizer(model: nn.Module, config: OptimConfig, total_steps: int):
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr, betas=tuple(config.betas), eps=config.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, total_steps)
    )
    return optimizer, scheduler
