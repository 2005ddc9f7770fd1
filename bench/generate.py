"""Generation speed through transformers' generate(): our KV cache against recomputing.

    python bench/generate.py --json generate.json
    python bench/generate.py --presets moa_metric --prompt 128 --new-tokens 32 --repeats 1
    python bench/generate.py --presets moa_metric gpt --d-model 128 --n-layers 4 --n-heads 4
    python bench/generate.py --presets moa_metric --schemes \
        --arm balls model=moa_metric attention.paths.1.use_balls=true

Every language-model preset of `conf/model/` (not the Reactive Transformer's) at `--size`
(`--d-model`, `--n-layers` and `--n-heads` over it compare presets at equal width and
depth; the context stretched to prompt + new tokens, the vocabulary `--vocab-size`),
random weights, wrapped in `moa.hf.modeling.MoaForCausalLM`: greedy generation of
`--new-tokens` after a random `--prompt`-token prompt, batch 1, `use_cache=True` (prefill
once, then one token per step through `MoaCache`) against `use_cache=False` (the whole
context recomputed at every step, as MoA-100M's card does). tokens/s is new tokens over
the median wall time of `--repeats` runs, prefill included; `speedup` is cached over
recomputed tokens/s in the same run. Latency: one decode step at each of `--contexts`
context lengths, cached (one token after a prefill of the context) and recomputed (a
forward over the whole context), median of `--steps` steps, the presets taking turns step
by step (so their ratio holds on a loaded machine); `--compile` adds `compiled_step_ms`,
the cached step as `sampling.compile=true` decodes (`decoding_step`). `cached_step_ops`
counts the top-level aten ops of one cached decode step after a `--prompt`-token prefill
(torch.profiler): a figure that, unlike the milliseconds, the machine's load leaves
alone. `--breakdown` adds, per preset, the ms of a cached step spent in each part of the
model (each block's attention and its router and paths, FFN, norms; the head's parts),
summed over the blocks (`step_breakdown`). `--arm LABEL OVERRIDE...` (repeatable) adds a
model that the Hydra overrides give (`model=<preset>` among them, the size arguments over
them; `bench/arms.py`), reported as LABEL beside the presets and taking turns with them
step by step.

KV-cache bytes per token: after the prompt, every tensor the cache holds for the
sequence, per position (our buffers are preallocated to the capacity, so bytes over
capacity), for the attention schemes (`model=gpt attention=<scheme>`) and the presets;
`state_bytes` is what does not grow with the context (convolution windows, running sums).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from arms import add_arm_argument, arm_overrides
from torch import nn
from torch.profiler import ProfilerActivity, profile

from moa.hf.modeling import MoaConfig, MoaForCausalLM
from moa.layers.kv_cache import LayerCache
from moa.models.generation import decoding_step
from moa.params import language_model_presets, model_config

SCHEMES = ["mha", "gqa", "mqa", "sqa", "metric", "moas"]


def presets() -> list[str]:
    """The language-model presets of conf/model/ (the Reactive Transformer's decoding is
    bench/interaction_latency.py's)."""
    return language_model_presets()


def build(overrides: list[str], args: argparse.Namespace) -> MoaForCausalLM:
    """The model at `--size`, with any of `--d-model`, `--n-layers`, `--n-heads` over it."""
    shape = [f"model.{key}={value}" for key, value in
             (("d_model", args.d_model), ("n_layers", args.n_layers), ("n_heads", args.n_heads))
             if value is not None]
    config = model_config([*overrides, f"model.size={args.size}", *shape,
                           f"model.max_seq_len={args.prompt + args.new_tokens}",
                           f"model.vocab_size={args.vocab_size}"])
    torch.manual_seed(0)
    return MoaForCausalLM(MoaConfig.from_model_config(config)).eval()


def timed(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def generation_speed(model: MoaForCausalLM, args: argparse.Namespace) -> dict[str, float]:
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt))
    record = {}
    for label, use_cache in (("cached", True), ("recompute", False)):
        seconds = timed(lambda c=use_cache: model.generate(
            prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            do_sample=False, use_cache=c), args.repeats)
        record[f"{label}_tokens_per_s"] = args.new_tokens / seconds
    record["speedup"] = record["cached_tokens_per_s"] / record["recompute_tokens_per_s"]
    return record


@torch.no_grad()
def step_latency(models: dict[str, MoaForCausalLM], args: argparse.Namespace
                 ) -> dict[str, dict[str, dict[int, float]]]:
    """ms of one decode step at each context length, cached and recomputed (and with
    `--compile` cached through each model's `decoding_step`), per preset. The presets take
    turns step by step, so a slowdown of a shared machine hits them alike and the ratio of
    two presets' steps holds within one run."""
    latency = {name: {"cached_step_ms": {}, "recompute_step_ms": {}} for name in models}
    eager = {name: model.model for name, model in models.items()}
    compiled = {name: decoding_step(model.model) for name, model in models.items()
                } if args.compile else {}
    for context in args.contexts:
        ids = torch.randint(0, args.vocab_size, (1, context))
        for key, steppers, untimed in (("cached_step_ms", eager, 0),
                                       ("compiled_step_ms", compiled, 2)):
            for name, ms in cached_step_ms(models, steppers, ids, args.steps, untimed).items():
                latency[name].setdefault(key, {})[context] = ms
        recompute = {name: [] for name in models}
        for _ in range(max(1, args.steps // 4)):
            for name, model in models.items():
                start = time.perf_counter()
                model.model(ids)
                recompute[name].append(time.perf_counter() - start)
        for name in models:
            latency[name]["recompute_step_ms"][context] = 1e3 * statistics.median(recompute[name])
    return latency


def cached_step_ms(models: dict[str, MoaForCausalLM], steppers: dict[str, Any],
                   ids: torch.Tensor, steps: int, untimed: int) -> dict[str, float]:
    """Median ms of a cached one-token step through each model's stepper at the context of
    `ids` (1, S): the rest prefilled eagerly, `untimed` steps (a compiled step's first
    compiles), then `steps` timed, the presets taking turns. {} without steppers."""
    caches = {name: models[name].model.new_cache() for name in steppers}
    for name in steppers:
        models[name].model(ids[:, :ids.size(1) - steps - untimed], caches[name])
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for t in range(ids.size(1) - steps - untimed, ids.size(1)):
        for name, step in steppers.items():
            start = time.perf_counter()
            step(ids[:, t:t + 1], caches[name])
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(spent[untimed:]) for name, spent in times.items()}


@torch.no_grad()
def cached_step_ops(model: MoaForCausalLM, prompt: int, vocab_size: int) -> int:
    """Top-level aten ops (those no other aten op called) of one cached decode step, on a
    fixed random prompt (the routing, and so the paths run, follows the tokens)."""
    ids = torch.randint(0, vocab_size, (1, prompt + 2), generator=torch.Generator().manual_seed(0))
    cache = model.model.new_cache()
    model.model(ids[:, :prompt], cache)
    model.model(ids[:, prompt:prompt + 1], cache)  # a first step: anything made once
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model.model(ids[:, prompt + 1:], cache)
    return sum(1 for event in profiler.events() if event.name.startswith("aten::") and (
        event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


# The parts `--breakdown` times: the blocks' and the head's children (each block's as
# `blocks.*.`), and within them a mixture's router and paths and a HyperFFN's router.
PARTS = re.compile(r"embedding|norm|lm_head|(blocks\.\*|lm_head)\.[^.]+(\.(router|paths\.\d+))?")


@torch.no_grad()
def step_breakdown(model: MoaForCausalLM, args: argparse.Namespace) -> dict[str, float]:
    """ms per cached decode step spent in each of the model's `PARTS` (a part's time holds
    its sub-parts'), timed by forward hooks over `--new-tokens` steps after a
    `--prompt`-token prefill, and `step`, the whole step's with the hooks in it. The hooks
    take time of their own (a few microseconds a module): read the parts against each
    other and against `step`, not against an unhooked step."""
    spent: dict[str, float] = defaultdict(float)
    started: dict[str, float] = {}
    handles = []
    for name, module in model.model.named_modules():
        part = re.sub(r"blocks\.\d+", "blocks.*", name)
        if not PARTS.fullmatch(part):
            continue

        def before(module: nn.Module, inputs: Any, name: str = name) -> None:
            started[name] = time.perf_counter()

        def after(module: nn.Module, inputs: Any, output: Any, name: str = name,
                  part: str = part) -> None:
            spent[part] += time.perf_counter() - started[name]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    ids = torch.randint(0, args.vocab_size, (1, args.prompt + args.new_tokens))
    cache = model.model.new_cache()
    model.model(ids[:, :args.prompt], cache)
    spent.clear()
    for t in range(args.prompt, args.prompt + args.new_tokens):
        start = time.perf_counter()
        model.model(ids[:, t:t + 1], cache)
        spent["step"] += time.perf_counter() - start
    for handle in handles:
        handle.remove()
    return {part: 1e3 * seconds / args.new_tokens for part, seconds in sorted(spent.items())}


def cache_bytes(model: MoaForCausalLM, prompt: int, vocab_size: int) -> dict[str, float]:
    """What the cache holds after a random prompt: bytes per position (`held_bytes`: a
    ball-aware cache holds only its kept keys) and the bytes that do not grow with it."""
    cache = model.model.new_cache()
    with torch.no_grad():
        model.model(torch.randint(0, vocab_size, (1, prompt)), cache)
    state = _state_bytes([*cache.layers, cache.ffn, cache.head])
    return {"kv_bytes_per_token": cache.held_bytes() / prompt, "state_bytes": state}


def _state_bytes(caches: list[LayerCache]) -> int:
    """Bytes of the tensors `caches` and their children keep besides their sequences."""
    state = 0
    for layer in caches:
        for value in layer.state.values():
            if isinstance(value, LayerCache):
                state += _state_bytes([value])
            elif isinstance(value, torch.Tensor):
                state += value.numel() * value.element_size()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=None, help="default: all of conf/model")
    parser.add_argument("--schemes", nargs="*", default=SCHEMES)
    parser.add_argument("--size", default="small")
    parser.add_argument("--d-model", type=int, default=None, help="over the size's (presets "
                        "differ at one size: gpt small is 256 wide, moa_metric small 128)")
    parser.add_argument("--n-layers", type=int, default=None)
    parser.add_argument("--n-heads", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contexts", type=int, nargs="*", default=[64, 256, 512, 767])
    parser.add_argument("--steps", type=int, default=8, help="decode steps per latency point")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's); 1 on a shared machine keeps small ops from thrashing")
    parser.add_argument("--compile", action="store_true", help="also time the cached step "
                        "compiled as `sampling.compile=true` runs it (`compiled_step_ms`)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each part of a cached step (`step_breakdown`)")
    add_arm_argument(parser)
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()
    arms = dict(arm_overrides(args.arm, args.presets or presets()))
    if args.threads:
        torch.set_num_threads(args.threads)

    records: dict[str, Any] = {"settings": {**vars(args), "threads": torch.get_num_threads()},
                               "presets": [], "schemes": []}
    print(f"size={args.size} d_model={args.d_model} n_layers={args.n_layers} "
          f"n_heads={args.n_heads} prompt={args.prompt} new={args.new_tokens} "
          f"vocab={args.vocab_size} batch=1 threads={torch.get_num_threads()}; "
          f"median of {args.repeats}")
    print(f"{'preset':<12} {'params':>10} {'cached tok/s':>13} {'recompute tok/s':>16} "
          f"{'speedup':>8} {'KV B/token':>11} {'ops/step':>8}  cached | recompute ms/step at "
          f"{args.contexts}")
    models = {name: build(overrides, args) for name, overrides in arms.items()}
    latency = step_latency(models, args)
    for name, model in models.items():
        record = {"preset": name, "overrides": arms[name],
                  "parameters": model.model.num_parameters(),
                  **generation_speed(model, args), **latency[name],
                  **cache_bytes(model, args.prompt, args.vocab_size),
                  "cached_step_ops": cached_step_ops(model, args.prompt, args.vocab_size)}
        records["presets"].append(record)
        cached = " ".join(f"{v:.1f}" for v in record["cached_step_ms"].values())
        recompute = " ".join(f"{v:.1f}" for v in record["recompute_step_ms"].values())
        if args.compile:
            cached += " (compiled " + " ".join(
                f"{v:.1f}" for v in record["compiled_step_ms"].values()) + ")"
        print(f"{name:<12} {record['parameters']:>10,} {record['cached_tokens_per_s']:>13.1f} "
              f"{record['recompute_tokens_per_s']:>16.1f} {record['speedup']:>8.1f} "
              f"{record['kv_bytes_per_token']:>11,.0f} {record['cached_step_ops']:>8}  "
              f"{cached} | {recompute}")
    for name, model in models.items() if args.breakdown else ():
        record = next(r for r in records["presets"] if r["preset"] == name)
        record["breakdown_ms"] = step_breakdown(model, args)
        print(f"\n{name}: ms per cached step (hooked), by part")
        for part, ms in record["breakdown_ms"].items():
            print(f"{ms:8.3f}  {part}")

    print(f"\n{'scheme':<12} {'KV bytes/token':>15} {'state bytes':>12}   (model=gpt)")
    for scheme in args.schemes:
        record = {"scheme": scheme, **cache_bytes(build(["model=gpt", f"attention={scheme}"],
                                                        args), args.prompt, args.vocab_size)}
        records["schemes"].append(record)
        print(f"{scheme:<12} {record['kv_bytes_per_token']:>15,.0f} {record['state_bytes']:>12,}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
