"""Attention kernels beside their pure-PyTorch references (the reference is the spec).

`metric_reference` (eager), `metric_cpu` (PyTorch's fused CPU flash kernel),
`metric_triton` (Triton; imported only where used, as triton is an optional extra) and
`metric_flex` (FlexAttention, benchmarked against Triton on GPU; no kernel choice selects
it yet) share one signature: see `metric_reference.py`. `pruned_attention` is the CPU
kernel over the keys a ball keeps, and `causal_conv` the depthwise causal convolution of
the conv paths, each C++ beside its reference, compiled on first use (`extension`).
`dot_product` is PyTorch's attention with a decoding step's GQA/MQA queries grouped by
key head, which the dot-product schemes and metric attention's dot-product forms call.
"""
