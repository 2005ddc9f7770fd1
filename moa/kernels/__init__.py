"""Attention kernels beside their pure-PyTorch references (the reference is the spec).

`metric_reference` (eager), `metric_cpu` (PyTorch's fused CPU flash kernel),
`metric_triton` (Triton; imported only where used, as triton is an optional extra) and
`metric_flex` (FlexAttention, benchmarked against Triton on GPU; no kernel choice selects
it yet) share one signature: see `metric_reference.py`. `key_compaction` plans the CPU
kernel's calls over the keys a ball keeps.
"""
