"""Benchmark metric attention against dot-product SDPA: time and peak memory.

    python bench/attention.py --device cpu --json bench-cpu.json
    python bench/attention.py --device cuda --dtype bfloat16 --json bench-gpu.json
    python bench/attention.py --device cpu --balls 0.25,0.5,0.75 --json bench-balls.json

For each L (512..4096, 8192 on GPU), H=8, D=64, batch 1 (`--batch`), causal: forward and
forward+backward time (median of --repeats runs after a warm-up; on CUDA the median of
`triton.testing.do_bench`, timed with CUDA events) and the peak memory the
call allocates above what was allocated before it. Implementations: `sdpa` (dot-product
`F.scaled_dot_product_attention`, held to its flash backend on CUDA), `eager` (the metric
reference), `cpu_fused` (CPU) or `triton` (CUDA), and on CUDA `flex` if asked for
(`--impls sdpa triton flex`: FlexAttention with the metric's key bias as its `score_mod`,
`moa/kernels/metric_flex.py`). Each metric row carries
`ratio_to_sdpa`, its time over SDPA's in the same run. Peak memory (of one
forward+backward): on CUDA, `torch.cuda.max_memory_allocated` after a reset, less what
was allocated before; on CPU, torch's profiler with `profile_memory=True` records every
allocation and free of torch's CPU allocator (inside ops too), and the peak is the
maximum of their running sum, in time order, over the call. `--profile` (CUDA) adds each
forward+backward's GPU kernel times and its host and device totals, from torch's profiler.

`--balls P1,P2,...` times ball pruning instead (L 2048 and 4096 unless --lengths): the
fused kernel of the device (or each of --impls, e.g. `triton flex` on CUDA) unpruned
(gate None), then with a ball (`BallPruning`, origin 0,
radius 1, band 0.5, the radius learned so the backward computes the gate's gradient) that
keeps a fraction p of the keys: key directions are random and their norms uniform on
(0, 1/p), so a fraction p lies inside. On CPU the unpruned and pruned calls take turns in
each repeat (a loaded machine slows them alike). Each row carries the measured
`kept_fraction` and `ratio_to_unpruned`, its time over the unpruned kernel's in the same
run. `--block-rows N` sets the CPU kernel's queries per block
(`moa/kernels/pruned_attention.py`'s ROWS); each CPU ball row records the value it ran with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moa.attention.balls import BallPruning
from moa.kernels import pruned_attention
from moa.kernels.metric_cpu import metric_attention_cpu
from moa.kernels.metric_reference import metric_attention_eager
from moa.training.memory import peak_allocated_mb

H, D = 8, 64


def _inputs(batch: int, L: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    q, k, v = (torch.randn(batch, H, L, D, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    alpha = torch.full((H,), 0.1, device=device, requires_grad=True)
    return [q, k, v, alpha]


def _sdpa(q, k, v, alpha):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if q.is_cuda else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


FUSED = {"cpu": "cpu_fused", "cuda": "triton"}  # the fused metric kernel of each device


def _kernel(impl: str) -> Callable[..., torch.Tensor]:
    if impl == "triton":
        from moa.kernels.metric_triton import metric_attention_triton

        return metric_attention_triton
    if impl == "flex":
        from moa.kernels.metric_flex import metric_attention_flex

        return metric_attention_flex
    return {"eager": metric_attention_eager, "cpu_fused": metric_attention_cpu}[impl]


def _call(impl: str) -> Callable[..., torch.Tensor]:
    if impl == "sdpa":
        return _sdpa
    fn = _kernel(impl)
    return lambda q, k, v, alpha: fn(q, k, v, k.float().pow(2).sum(-1), alpha, None)


def _fractions(text: str) -> list[float]:
    """--balls: comma-separated kept fractions in (0, 1]."""
    fractions = [float(part) for part in text.split(",")]
    if not all(0 < p <= 1 for p in fractions):
        raise argparse.ArgumentTypeError(f"kept fractions must lie in (0, 1], got {text}")
    return fractions


def _ball_inputs(batch: int, L: int, kept: float, device: str, dtype: torch.dtype
                 ) -> tuple[list, BallPruning]:
    """q, k, v, alpha with key norms uniform on (0, 1/kept), and a ball of radius 1 at the
    origin: it keeps a fraction `kept` of the keys."""
    q, k, v, alpha = _inputs(batch, L, device, dtype)
    with torch.no_grad():
        norms = torch.rand(batch, H, L, 1, device=device) / kept
        k.copy_(F.normalize(k.float(), dim=-1) * norms)
    balls = BallPruning(H, D, radius_init=1.0, learn_radius=True, origin_init_scale=0.0,
                        band=0.5).to(device)
    return [q, k, v, alpha], balls


def _pruned(fn, balls: BallPruning) -> Callable[..., torch.Tensor]:
    def call(q, k, v, alpha):
        gate, band = balls(k.detach())
        return fn(q, k, v, k.float().pow(2).sum(-1), alpha, gate, band)
    return call


def _interleaved_ms(setups: list[tuple], device: str, repeats: int) -> list[tuple[float, float]]:
    """(forward, forward+backward) ms of each (call, inputs). On CPU the setups take turns
    within each repeat, so a load that comes and goes weighs on all of them alike."""
    if device == "cuda":
        return [(_time_ms(call, inputs, False, device, repeats),
                 _time_ms(call, inputs, True, device, repeats)) for call, inputs in setups]
    times = [([], []) for _ in setups]
    for call, inputs in setups:  # warm-up
        _step(call, inputs, True)
    for _ in range(repeats):
        for (call, inputs), (fwd, fwd_bwd) in zip(setups, times, strict=True):
            for backward, record in ((False, fwd), (True, fwd_bwd)):
                start = time.perf_counter()
                _step(call, inputs, backward)
                record.append(time.perf_counter() - start)
    return [(1e3 * statistics.median(fwd), 1e3 * statistics.median(fwd_bwd))
            for fwd, fwd_bwd in times]


def _ball_rows(args, impls: list[str], device: str, dtype: torch.dtype) -> list[dict]:
    """Each kernel unpruned and at each kept fraction of --balls, per length."""
    records = []
    levels = {"block_rows": pruned_attention.ROWS} if device == "cpu" else {}
    print(f"{'impl':>10} {'L':>6} {'kept':>6} {'fwd_ms':>9} {'fwd_bwd_ms':>11} {'ratio':>11}")
    for impl, L in ((impl, L) for impl in impls for L in args.lengths or [2048, 4096]):
        fn = _kernel(impl)
        setups, kept = [], []
        for target in [1.0, *args.balls]:
            torch.manual_seed(0)
            inputs, balls = _ball_inputs(args.batch, L, target, device, dtype)
            if setups:
                setups.append((_pruned(fn, balls), inputs))
                kept.append(balls(inputs[1].detach()).gate.mean().item())
            else:  # the same kernel with no gate
                setups.append((_call(impl), inputs))
                kept.append(1.0)
        times = _interleaved_ms(setups, device, args.repeats)
        for fraction, (fwd, fwd_bwd) in zip(kept, times, strict=True):
            ratio = {"fwd": fwd / times[0][0], "fwd_bwd": fwd_bwd / times[0][1]}
            records.append(dict(impl=impl, L=L, device=device, dtype=str(dtype).split(".")[-1],
                                batch=args.batch, H=H, D=D, kept_fraction=fraction,
                                fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, ratio_to_unpruned=ratio,
                                **levels))
            print(f"{impl:>10} {L:>6} {fraction:6.3f} {fwd:9.2f} {fwd_bwd:11.2f} "
                  f"{ratio['fwd']:5.2f}/{ratio['fwd_bwd']:4.2f}", flush=True)
    return records


def _step(fn, inputs, backward: bool) -> None:
    if backward:
        fn(*inputs).sum().backward()
    else:
        with torch.no_grad():
            fn(*inputs)


def _time_ms(fn, inputs, backward: bool, device: str, repeats: int) -> float:
    _step(fn, inputs, backward)  # warm-up (and Triton compilation)
    if device == "cuda":  # CUDA events around each run, in triton's timer
        from triton.testing import do_bench

        return do_bench(partial(_step, fn, inputs, backward), return_mode="median")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(fn, inputs, backward)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _profile(fn, inputs, calls: int = 10) -> dict:
    """One forward+backward's GPU kernels (ms each), and its host and device totals (ms),
    averaged over `calls` calls under torch's profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _step(fn, inputs, True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            _step(fn, inputs, True)
        torch.cuda.synchronize()
    events = profiler.key_averages()
    kernels = {event.key: event.self_device_time_total / 1e3 / calls for event in events
               if event.device_type == DeviceType.CUDA and event.self_device_time_total > 0}
    host = sum(event.self_cpu_time_total for event in events) / 1e3 / calls
    return dict(kernels_ms=kernels, device_ms=sum(kernels.values()), host_ms=host)


def _sdpa_rows(args, impls: list[str], device: str, dtype: torch.dtype) -> list[dict]:
    """Each implementation at each length, with its time over SDPA's."""
    records = []
    print(f"{'impl':>10} {'L':>6} {'fwd_ms':>9} {'fwd_bwd_ms':>11} {'peak_mb':>9} {'ratio':>11}")
    lengths = args.lengths or [512, 1024, 2048, 4096] + ([8192] if device == "cuda" else [])
    for L in lengths:
        sdpa_times = None
        for impl in impls:
            torch.manual_seed(0)
            inputs = _inputs(args.batch, L, device, dtype)
            fn = _call(impl)
            fwd = _time_ms(fn, inputs, False, device, args.repeats)
            fwd_bwd = _time_ms(fn, inputs, True, device, args.repeats)
            peak = peak_allocated_mb(partial(_step, fn, inputs, backward=True), device)
            sdpa_times = sdpa_times or (fwd, fwd_bwd)
            ratio = {"fwd": fwd / sdpa_times[0], "fwd_bwd": fwd_bwd / sdpa_times[1]}
            records.append(dict(impl=impl, L=L, device=device, dtype=str(dtype).split(".")[-1],
                                batch=args.batch, H=H, D=D, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                                peak_mb=peak, ratio_to_sdpa=ratio))
            print(f"{impl:>10} {L:>6} {fwd:9.2f} {fwd_bwd:11.2f} {peak:9.1f} "
                  f"{ratio['fwd']:5.2f}/{ratio['fwd_bwd']:4.2f}", flush=True)
            if args.profile:
                records[-1]["profile"] = profiled = _profile(fn, inputs)
                top = sorted(profiled["kernels_ms"].items(), key=lambda item: -item[1])[:4]
                print(f"{'':>10} device {profiled['device_ms']:.3f} ms, host "
                      f"{profiled['host_ms']:.3f} ms per forward+backward; kernels: "
                      + ", ".join(f"{name[:48]} {ms:.3f}" for name, ms in top), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="CPU runs (CUDA: do_bench's)")
    parser.add_argument("--impls", nargs="*", default=None,
                        help="default: sdpa, eager and the fused one of the device")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: also each forward+backward's kernel times (torch profiler)")
    parser.add_argument("--balls", type=_fractions, default=None,
                        help="kept fractions, e.g. 0.25,0.5,0.75: time ball pruning instead")
    parser.add_argument("--block-rows", type=int, default=None,
                        help="with --balls on CPU: the kernel's queries per block")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()
    if args.block_rows is not None:
        if not (args.balls and args.device == "cpu"):
            parser.error("--block-rows sets the CPU kernel's blocks: use it with --balls")
        if args.block_rows < 1:
            parser.error(f"--block-rows must be positive, got {args.block_rows}")
        pruned_attention.ROWS = args.block_rows
    if args.profile and args.device != "cuda":
        parser.error("--profile reads GPU kernel times: use it with --device cuda")
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if "flex" in (args.impls or []) and device != "cuda":
        parser.error("--impls flex needs --device cuda: FlexAttention has no CPU backward")
    if args.balls:
        impls = args.impls or [FUSED[device]]
        if "sdpa" in impls:
            parser.error("--balls times metric kernels: --impls without sdpa, e.g. triton flex")
        records = _ball_rows(args, impls, device, dtype)
    else:
        impls = args.impls or ["sdpa", "eager", FUSED[device]]
        if impls[0] != "sdpa":
            parser.error("--impls starts with sdpa, the baseline of every ratio")
        records = _sdpa_rows(args, impls, device, dtype)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(records, file, indent=2)


if __name__ == "__main__":
    main()
