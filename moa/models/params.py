"""What a model costs, counted on the model itself: parameters per top-level component,
the parameters one token runs through under top-k routing, and the KV cache it adds when
decoding. `python -m moa.params` prints the table for a config preset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moa.layers.kv_cache import CompactCache, LayerCache
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


@dataclass
class CacheMeasure:
    bytes_per_token: float  # what the decoding cache holds per position, batch 1
    kept_fraction: float | None  # of the keys the ball-pruned layers saw; None: no balls
    tokens: int  # positions decoded to measure it


@torch.no_grad()
def measure_kv_cache(model: nn.Module, tokens: int = 64, seed: int = 0) -> CacheMeasure:
    """The decoding cache measured on the model as it is: a random prompt of 3/4 of
    `tokens` (at most max_seq_len) in one call, then one token at a time, batch 1, in eval
    mode; the bytes every layer, branch and the head then hold (`KVCache.held_bytes`), per
    position. Ball-pruned metric attention keeps only the keys inside its balls, so its
    share follows what the balls keep (`kept_fraction`, over those layers' keys)."""
    tokens = min(tokens, model.config.max_seq_len)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    cache = model.new_cache(capacity=tokens)
    was_training = model.training
    model.eval()
    prompt = max(1, 3 * tokens // 4)
    model(ids[:, :prompt], cache)
    for t in range(prompt, tokens):
        model(ids[:, t:t + 1], cache)
    model.train(was_training)
    compact = list(_compact_caches([*cache.layers, cache.ffn, cache.head]))
    kept = None
    if compact:
        kept = sum(int(c.counts.sum()) for c in compact) / (
            tokens * sum(c.counts.numel() for c in compact))
    return CacheMeasure(cache.held_bytes() / tokens, kept, tokens)


def kv_cache_bytes_per_token(model: nn.Module) -> float:
    """Bytes the decoding cache holds per token, measured (`measure_kv_cache`)."""
    return measure_kv_cache(model).bytes_per_token


def _compact_caches(caches: list[LayerCache]) -> Iterator[CompactCache]:
    for cache in caches:
        for value in cache.state.values():
            if isinstance(value, CompactCache):
                yield value
            elif isinstance(value, LayerCache):
                yield from _compact_caches([value])
