"""Peak memory a call allocates, for benchmarks: above what was allocated before it.

On CUDA, the caching allocator's peak statistics. On CPU, torch's profiler with
`profile_memory=True` records every allocation and free of torch's CPU allocator
(including those inside fused kernels); the peak is the maximum of their running sum in
time order. The process's size is never used. Memory held outside torch (a FAISS index)
is not counted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def peak_allocated_mb(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Run `fn()` once and return the peak MiB it allocated above the starting level."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []  # (time, +bytes allocated | -bytes freed)
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak / 2**20
