"""Calls timed in turns: each kernel once per round, so a slowdown of a shared machine hits
them alike (`bench/gelu.py`, `bench/decode_attention.py`)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


@torch.no_grad()
def median_microseconds(kernels: dict[str, Callable[..., object]], inputs: tuple, calls: int,
                        warmup: int) -> dict[str, float]:
    """Each of `kernels`' median call on `inputs` in microseconds: `calls` rounds of one
    call each, after `warmup` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for round_ in range(warmup + calls):
        for name, kernel in kernels.items():
            start = time.perf_counter()
            kernel(*inputs)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(seconds) for name, seconds in times.items()}


def add_arguments(parser: argparse.ArgumentParser, calls: int, warmup: int) -> None:
    """--calls, --warmup, --threads (set by `parse`) and --json."""
    parser.add_argument("--calls", type=int, default=calls)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", default=None, help="write the records here")


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, with torch's threads set as --threads says."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
