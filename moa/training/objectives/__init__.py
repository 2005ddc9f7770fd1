"""Training objectives (`objective=NAME`): one module a stage, registered in `OBJECTIVES`.

    lm          next-token cross-entropy of a decoder-only model (the default)
    mlm         masked language modelling of an encoder with its MLM head
    rxt_joint   the Reactive Transformer's joint pre-training: MLM + AR, the decoder reading
                the encoder's detached layers
    rxt_sft     the same on `[Q] query [A] answer` interactions
    rxt_memory  self-supervised memory-attention pre-training (negative cosine)
    rxt_smat    supervised memory-aware training on multi-turn conversations
"""

from moa.training.objectives import joint, memory_attention, memory_aware  # noqa: F401
from moa.training.objectives.base import OBJECTIVES, Objective, SpecialTokens, StepOutput
from moa.training.objectives.language_model import scored_forward, token_metrics
from moa.training.objectives.scores import ConversationScores

__all__ = ["OBJECTIVES", "ConversationScores", "Objective", "SpecialTokens", "StepOutput",
           "scored_forward", "token_metrics"]
