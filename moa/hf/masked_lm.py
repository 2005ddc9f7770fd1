"""Hugging Face interop for a Reactive Transformer's encoder and MLM head: a transformers
masked LM, so `pipeline("fill-mask", model=DIR)` works on `python -m moa.export ...
part=encoder`'s directory after `import moa` (which registers model_type "moa_rxt_encoder").

`MoaEncoderConfig` holds our `ReactiveConfig` as a dict (`moa`); `MoaForMaskedLM` wraps a
`ReactiveTransformer` without its decoder and memory attention (`encoder_only`), its
weights `model.<our names>`, so logits equal `mlm_logits(encode(ids).hidden)`. An encoder
that reads the memory (RxNN's, `model.encoder_reads_memory`) reads the initial STM, as in
MLM pre-training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from moa.hf.modeling import MoaConfig, fill_position_tables
from moa.models.language_model import init_weights
from moa.models.reactive import ReactiveTransformer

MODEL_TYPE = "moa_rxt_encoder"


class MoaEncoderConfig(MoaConfig):
    """`moa`: our `ReactiveConfig.to_dict()`, read as `MoaConfig` reads a decoder's."""

    model_type = MODEL_TYPE


class MoaForMaskedLM(PreTrainedModel):
    config_class = MoaEncoderConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: MoaEncoderConfig) -> None:
        super().__init__(config)
        self.model = ReactiveTransformer(config.model_config()).encoder_only()
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        config = self.model.config
        if module is self.model.position:
            fill_position_tables(module, config)
        else:
            init_weights(module, config.init_std, config.n_layers)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **_: Any) -> MaskedLMOutput:
        """input_ids (B, L), attention_mask (B, L) 0 at padding -> MLM logits (B, L, V);
        the loss over the positions whose label is not -100."""
        pad_mask = None if attention_mask is None else attention_mask.bool()
        logits = self.model.mlm_logits(self.model.encode(input_ids, pad_mask).hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
