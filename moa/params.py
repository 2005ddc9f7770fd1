"""Parameter counts per component of a model preset, without data and without memory.

    python -m moa.params model=discoverlm model.size=card
    python -m moa.params model=gpt attention=gqa position=blackhole_rope

Composes `conf/train.yaml` with the overrides, checks it as `train.py` would, builds the
model on the meta device and prints one row per top-level component (the model's own
child modules, in order; a list of blocks also gets one sub-row per block part, summed
over the blocks), then `Total  <millions>M`. A weight shared by two components (tied
embeddings) counts once, in the first: the LM head shows 0 when tied. The vocabulary is
`model.vocab_size` if set, else the tokenizer config's bound (bpe: its vocab_size, byte:
265), or the data's own (mqar).

`active_parameters` and `kv_cache_bytes_per_token` describe what one token costs: the
parameters it runs through under top-k routing, and the cache it adds when decoding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from torch import nn

from moa.config import ModelConfig
from moa.errors import ConfigError
from moa.kv_cache import LayerCache
from moa.model import build_model
from moa.router import TopKRouter
from moa.run_config import parse_run

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def model_config(overrides: list[str]) -> ModelConfig:
    """The checked ModelConfig of `conf/train.yaml` under `overrides`, vocabulary filled."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for `${hydra:...}` in the trainer/paths
    spec = parse_run(cfg)
    if spec.model.vocab_size is not None:
        return spec.model
    vocab = spec.tokenizer.max_vocab_size if spec.tokenizer is not None else spec.data.vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size", None, "a positive integer",
                          "the tokenizer's size is unknown until it is loaded")
    return spec.model.with_vocab(vocab)


def parameter_table(model: nn.Module) -> list[tuple[str, int]]:
    """(component, parameters) rows: each top-level child that holds parameters, and under
    a ModuleList (`blocks`) its children's parts summed over the list (`  attention`).
    Each parameter is counted once, in the first row that reaches it; top-level rows sum
    to the model's total."""
    seen: set[int] = set()
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


def format_table(rows: list[tuple[str, int]], title: str) -> str:
    total = sum(count for name, count in rows if not name.startswith(" "))
    width = max(len(name) for name, _ in rows + [("component", 0)])
    lines = [title, f"{'component':<{width}}  {'parameters':>13}  {'share':>6}"]
    for name, count in rows:
        lines.append(f"{name:<{width}}  {count:>13,}  {count / max(total, 1):>6.1%}")
    lines.append(f"Total  {total / 1e6:.2f}M")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        config = model_config(overrides)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    with torch.device("meta"):
        model = build_model(config)
    title = (f"model={config.name} size={config.size} d_model={config.d_model} "
             f"n_layers={config.n_layers} vocab={config.vocab_size}")
    print(format_table(parameter_table(model), title))


if __name__ == "__main__":
    main()
