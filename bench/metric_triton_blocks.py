"""Time the metric-attention Triton kernels under candidate launch parameters (CUDA only).

    python bench/metric_triton_blocks.py --length 4096 --json blocks.json

For each kernel of `moa/kernels/metric_triton.py` (forward, backward_keys,
backward_queries), every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) replaces that
kernel's entry of `CUDA_LAUNCH` while the others keep theirs. The forward candidates are
timed on the forward call, the backward ones on the backward call (one autograd.grad over
a saved graph). Times are medians of `triton.testing.do_bench`; `ratio` is over SDPA's
flash backend on the same pass, measured in the same run. A candidate that does not
compile or launch (too much shared memory) is listed with its error. The fastest candidate
per kernel is what `CUDA_LAUNCH` should hold.
"""

from __future__ import annotations

import argparse
import itertools
import json
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from moa.kernels import metric_triton

H, D = 8, 64
BLOCKS = [(m, n) for m, n in itertools.product([32, 64, 128], repeat=2) if (m, n) != (32, 32)]
WARPS = [4, 8]
STAGES = [2, 3]


def _inputs(batch: int, L: int, dtype: torch.dtype) -> list[torch.Tensor]:
    q, k, v = (torch.randn(batch, H, L, D, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    alpha = torch.full((H,), 0.1, device="cuda", requires_grad=True)
    k_norm = k.detach().float().pow(2).sum(-1).requires_grad_()
    return [q, k, v, k_norm, alpha]


def _median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def _pass_ms(forward, inputs, measured: str) -> float:
    """Median milliseconds of the forward call `forward(*inputs)` or of its backward."""
    if measured == "forward":
        return _median_ms(lambda: forward(*inputs))
    out = forward(*inputs)
    d_out = torch.randn_like(out)
    return _median_ms(lambda: torch.autograd.grad(out, inputs, d_out, retain_graph=True))


def _metric(q, k, v, k_norm, alpha):
    return metric_triton.metric_attention_triton(q, k, v, k_norm, alpha, None)


def _sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        default="bfloat16")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = _inputs(args.batch, args.length, getattr(torch, args.dtype))
    sdpa = {measured: _pass_ms(_sdpa, inputs[:3], measured)
            for measured in ("forward", "backward")}
    records = [dict(kernel="sdpa_flash", **sdpa)]
    print(f"sdpa flash: forward {sdpa['forward']:.3f} ms, backward {sdpa['backward']:.3f} ms")
    for kernel, measured in (("forward", "forward"), ("backward_keys", "backward"),
                             ("backward_queries", "backward")):
        print(f"\n{kernel:>16} {'M':>4} {'N':>4} {'warps':>5} {'stages':>6} {'ms':>8} {'ratio':>6}")
        for (block_m, block_n), warps, stages in itertools.product(BLOCKS, WARPS, STAGES):
            launch = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            record = dict(kernel=kernel, **launch)
            try:
                with mock.patch.dict(metric_triton.CUDA_LAUNCH, {kernel: launch}):
                    record["ms"] = _pass_ms(_metric, inputs, measured)
                record["ratio"] = record["ms"] / sdpa[measured]
                print(f"{'':>16} {block_m:>4} {block_n:>4} {warps:>5} {stages:>6} "
                      f"{record['ms']:8.3f} {record['ratio']:6.2f}", flush=True)
            except Exception as error:  # noqa: BLE001  a candidate that cannot launch
                record["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                print(f"{'':>16} {block_m:>4} {block_n:>4} {warps:>5} {stages:>6} "
                      f"failed: {record['error'][:60]}", flush=True)
            records.append(record)
        timed = [r for r in records if r["kernel"] == kernel and "ms" in r]
        best = min(timed, key=lambda r: r["ms"])
        print(f"best {kernel}: " + ", ".join(f"{key}={best[key]}" for key in launch)
              + f" ({best['ms']:.3f} ms, {best['ratio']:.2f}x sdpa)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(length=args.length, batch=args.batch, dtype=args.dtype, H=H, D=D,
                           device=torch.cuda.get_device_name(), records=records),
                      file, indent=2)


if __name__ == "__main__":
    main()
