"""The Reactive Transformer: encoder, MLM head, decoder with memory cross-attention, and
the gated memory attention that writes each interaction into the short-term memory."""

from moa.config import MemoryAttentionConfig, ReactiveConfig
from moa.models.reactive.memory import MemoryAttention
from moa.models.reactive.model import EncoderOutput, ReactiveTransformer

__all__ = ["EncoderOutput", "MemoryAttention", "MemoryAttentionConfig", "ReactiveConfig",
           "ReactiveTransformer"]
