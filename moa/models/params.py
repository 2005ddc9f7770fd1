"""What a model costs, counted on the model itself: parameters per top-level component,
the parameters one token runs through under top-k routing, and the KV cache it adds when
decoding. `python -m moa.params` prints the table for a config preset.
"""

from __future__ import annotations

import torch
from torch import nn

from moa.layers.kv_cache import LayerCache
from moa.layers.router import TopKRouter


def parameter_table(model: nn.Module) -> list[tuple[str, int]]:
    """(component, parameters) rows: each top-level child that holds parameters, and under
    a ModuleList (`blocks`) its children's parts summed over the list (`  attention`).
    Each parameter is counted once, in the first row that reaches it; top-level rows sum
    to the model's total. A model with `parameter_groups()` ((label, modules) pairs: the
    Reactive Transformer's Encoder, MLM head, ...) gets one row per group instead."""
    seen: set[int] = set()
    if hasattr(model, "parameter_groups"):
        return [(label, sum(_count_new(module, seen) for module in modules))
                for label, modules in model.parameter_groups()]
    rows = []
    for name, child in model.named_children():
        if next(child.parameters(), None) is None:
            continue
        parts: dict[str, int] = {}
        if isinstance(child, nn.ModuleList):
            for block in child:
                for part, module in block.named_children():
                    parts[part] = parts.get(part, 0) + _count_new(module, seen)
        rows.append((name, sum(parts.values()) if parts else _count_new(child, seen)))
        rows.extend((f"  {part}", count) for part, count in parts.items() if count)
    return rows


def _count_new(module: nn.Module, seen: set[int]) -> int:
    total = 0
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def active_parameters(model: nn.Module) -> int:
    """Parameters one token runs through: the total, less in each top-k routed module (a
    mixture's `paths`, the HyperFFN's `branches`) the branches it skips. A token runs k of
    the n branches; counting the k largest gives the most any token uses."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for module in model.modules():
        router = getattr(module, "router", None)
        if not isinstance(router, TopKRouter):
            continue
        branches = getattr(module, "paths", None) or module.branches
        sizes = sorted((sum(p.numel() for p in branch.parameters()) for branch in branches),
                       reverse=True)
        total -= sum(sizes[router.config.router_topk:])
    return total


@torch.no_grad()
def kv_cache_bytes_per_token(model: nn.Module, probe_tokens: int = 4) -> int:
    """Bytes the decoding cache grows by per token (batch 1, the model's dtype), measured
    by decoding `probe_tokens` tokens into a cache of that capacity: every buffer that grows
    with the sequence, in every layer and branch, divided by its length."""
    cache = model.new_cache(capacity=probe_tokens)
    was_training = model.training
    model.eval()
    model(torch.zeros(1, probe_tokens, dtype=torch.long,
                      device=next(model.parameters()).device), cache)
    model.train(was_training)
    pending = [*cache.layers, cache.ffn, cache.head]
    total = 0
    while pending:
        layer = pending.pop()
        total += sum(buffer.numel() * buffer.element_size() for buffer in layer.buffers.values())
        pending.extend(state for state in layer.state.values() if isinstance(state, LayerCache))
    return total // probe_tokens
