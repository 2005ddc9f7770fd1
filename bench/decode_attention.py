"""A decoding step's attention: one query per head over a KV cache, by head layout and context.

    python bench/decode_attention.py --threads 1 --json decode_attention.json

For each head layout (`--layouts` as query heads/key heads: 8/8 is MHA, 8/2 GQA, 8/1
MQA) and cache length, one query per head attends over the cache's first S keys and
values (views into a preallocated cache, as `LayerCache` holds them), through PyTorch's
`scaled_dot_product_attention` with `enable_gqa` and through
`moa.kernels.dot_product.dot_product_attention`, which passes a key head's group of
queries as its rows. The two take turns call by call after a warm-up, so a slowdown of a
shared machine hits them alike. `us` is each one's median call in microseconds,
`ratio_to_sdpa` its time over PyTorch's in the same run (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from interleaved import add_arguments, median_microseconds, parse

from moa.kernels.dot_product import dot_product_attention


def pytorch_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.size(1) != k.size(1))


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": pytorch_gqa, "moa": dot_product_attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="*", default=["8/8", "8/2", "8/1"],
                        help="query heads/key heads")
    parser.add_argument("--contexts", type=int, nargs="*", default=[64, 256, 767, 2048])
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    add_arguments(parser, calls=1000, warmup=100)
    args = parse(parser)

    records = []
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, head_dim {args.head_dim}")
    print(f"{'layout':>7} {'context':>8} " + " ".join(f"{name:>14}" for name in KERNELS)
          + "   (us, ratio to sdpa)")
    for layout in args.layouts:
        n_q, n_kv = (int(part) for part in layout.split("/"))
        B, D, longest = args.batch, args.head_dim, max(args.contexts)
        cache = torch.randn(2, B, n_kv, longest, D)  # keys and values, as a cache holds them
        for context in args.contexts:
            q = torch.randn(B, n_q, 1, D)
            k, v = cache[:, :, :, :context]
            medians = median_microseconds(KERNELS, (q, k, v), args.calls, args.warmup)
            for name, us in medians.items():
                records.append({"kernel": name, "n_q_heads": n_q, "n_kv_heads": n_kv,
                                "context": context, "head_dim": D, "batch": B,
                                "threads": torch.get_num_threads(), "us": us,
                                "ratio_to_sdpa": us / medians["sdpa"]})
            print(f"{layout:>7} {context:>8} " + " ".join(
                f"{us:>8.1f} {us / medians['sdpa']:5.2f}" for us in medians.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
