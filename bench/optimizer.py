"""AdamW's step alone, per `optim.impl`, for model presets at one common size.

    python bench/optimizer.py --json optimizer.json
    python bench/optimizer.py --presets gpt moa_metric --d-model 256 --device cuda

Each preset (as bench/throughput.py composes it: `--d-model`, `--n-layers`, `--n-heads`,
`--block-size`, `--vocab-size`) gets one optimizer per implementation (`fused`, `foreach`,
`for_loop`) over its parameter groups, with random gradients. After `--warmup` steps each,
the implementations take turns, one step each per round for `--steps` rounds, so a
slowdown of a shared machine hits them alike. `step_ms` is an implementation's median
step, `ratio_to_for_loop` the for_loop step over it in the same run (above 1: faster).
A MoA model holds several times a GPT's parameter tensors at the same width, and the
for_loop step's cost grows with their number rather than their size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from throughput import preset_config
from torch import nn

from moa.config import OptimConfig
from moa.models.language_model import build_model
from moa.training.optim import build_optimizer

IMPLS = ("fused", "foreach", "for_loop")


def step_times(preset: str, args: argparse.Namespace) -> tuple[dict[str, list[float]], nn.Module]:
    """Seconds per AdamW step of each implementation over the preset's parameters, and
    one of the models."""
    torch.manual_seed(0)
    models = {impl: build_model(preset_config(preset, args)).to(args.device) for impl in IMPLS}
    optimizers = {}
    for impl, model in models.items():
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter)
        optimizers[impl] = build_optimizer(model, OptimConfig(warmup_steps=0, impl=impl), 1)[0]
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for round_ in range(args.warmup + args.steps):
        for impl, optimizer in optimizers.items():
            synchronize(args.device)
            start = time.perf_counter()
            optimizer.step()
            synchronize(args.device)
            if round_ >= args.warmup:
                times[impl].append(time.perf_counter() - start)
    return times, models["fused"]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=["gpt", "moa_metric"])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()

    records = []
    for preset in args.presets:
        times, model = step_times(preset, args)
        tensors = sum(1 for _ in model.parameters())
        medians = {impl: statistics.median(seconds) for impl, seconds in times.items()}
        records += [{
            "preset": preset, "impl": impl, "step_ms": 1e3 * medians[impl],
            "ratio_to_for_loop": medians["for_loop"] / medians[impl],
            "parameter_tensors": tensors, "parameters": model.num_parameters(),
            "d_model": args.d_model, "n_layers": args.n_layers, "device": args.device,
            "threads": torch.get_num_threads(),
        } for impl in IMPLS]

    print(f"d_model={args.d_model} n_layers={args.n_layers} n_heads={args.n_heads} "
          f"device={args.device} threads={torch.get_num_threads()}; "
          f"median of {args.steps} steps")
    print(f"{'preset':<14} {'tensors':>8} {'impl':<9} {'step ms':>8} {'x for_loop':>10}")
    for r in records:
        print(f"{r['preset']:<14} {r['parameter_tensors']:>8} {r['impl']:<9} "
              f"{r['step_ms']:>8.2f} {r['ratio_to_for_loop']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
