"""Attention schemes, one module each, looked up by the `name` of the `attention` config.

A scheme is an `nn.Module` built as `builder(config, model_config)` whose forward is
`(x: (B, T, C), ctx: ForwardContext) -> (B, T, C)`. It must be causal, and must
decode incrementally through `ctx.cache` with the same results as a full forward.
"""

from moa.attention import (  # noqa: F401  (registers its schemes)
    alcca,
    channel_mix,
    dot_product,
    local_conv,
    metric,
    mixture,
)
from moa.attention.registry import ATTENTION

__all__ = ["ATTENTION"]
