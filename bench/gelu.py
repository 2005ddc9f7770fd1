"""Exact GELU on CPU: oneDNN, PyTorch's own kernel and `moa.layers.activation.gelu`, by size.

    python bench/gelu.py --threads 1 --json gelu.json

For each input of `--rows` x `--width` float32 elements, the three take turns call by
call for `--calls` rounds after a warm-up, so a slowdown of a shared machine hits them
alike. `us` is each one's median call in microseconds, `ratio_to_onednn` its time over
oneDNN's in the same run (below 1: faster). PyTorch sends every contiguous float32 CPU
input of two or more elements to oneDNN unless oneDNN is switched off; `gelu` switches it
off for inputs of at most `NATIVE_MAX_NUMEL` elements.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from interleaved import add_arguments, median_microseconds, parse

from moa.layers.activation import NATIVE_MAX_NUMEL, OneDNNOff, gelu


def without_onednn(x: torch.Tensor) -> torch.Tensor:
    """PyTorch's kernel at any size, switched as `gelu` switches it."""
    with OneDNNOff():
        return F.gelu(x)


KERNELS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "onednn": F.gelu, "pytorch": without_onednn, "moa": gelu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 4, 16, 32, 64, 256, 4096])
    parser.add_argument("--width", type=int, default=512)
    add_arguments(parser, calls=2000, warmup=200)
    args = parse(parser)

    records = []
    print(f"threads {torch.get_num_threads()}, moa's gelu leaves oneDNN for <= "
          f"{NATIVE_MAX_NUMEL} elements")
    print(f"{'rows':>6} {'elements':>9} " + " ".join(f"{name:>14}" for name in KERNELS)
          + "   (us, ratio to onednn)")
    for rows in args.rows:
        x = torch.randn(rows, args.width)
        calls = max(20, args.calls * 64 // max(rows, 64))
        medians = median_microseconds(KERNELS, (x,), calls, args.warmup)
        for name, us in medians.items():
            records.append({"kernel": name, "rows": rows, "width": args.width,
                            "elements": x.numel(), "threads": torch.get_num_threads(),
                            "us": us, "ratio_to_onednn": us / medians["onednn"]})
        print(f"{rows:>6} {x.numel():>9} " + " ".join(
            f"{us:>8.1f} {us / medians['onednn']:5.2f}" for us in medians.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
