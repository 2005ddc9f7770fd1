"""Hugging Face interop: our model as a transformers causal LM, with our KV cache.

    import moa                                   # registers model_type "moa_metric"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    # (or, without moa installed: from_pretrained(DIR, trust_remote_code=True), which runs
    # the copy of this file and the model code that the export wrote into DIR)
    model = AutoModelForCausalLM.from_pretrained(DIR)   # DIR from `python -m moa.export`
    tokenizer = AutoTokenizer.from_pretrained(DIR)
    out = model.generate(**tokenizer(["Once"], return_tensors="pt"), max_new_tokens=32)

`MoaConfig` holds our `ModelConfig` as a dict (`moa`); `MoaForCausalLM` wraps
`moa.models.language_model.LanguageModel` unchanged (its weights are `model.<our names>`),
so logits equal ours. `generate()` threads a `MoaCache` (transformers' `Cache` API around
our `KVCache`): every scheme and path keeps what it needs there (keys and values, metric
attention's key norms, ALCCA's index, the convolutions' rolling windows, the MoA LM head's
attention).

Padding: a batch without padding runs as one batch. A left-padded batch (attention_mask
with zeros at the start of rows) runs each row on its own, without its pads, each with its
own cache, so a padded row generates exactly what it generates alone, under every scheme
(the convolutions' state and absolute positions included), at the price of per-row steps.
Padding anywhere but on the left is refused. Beam search (reordering the cache) and
assisted generation are not supported.

transformers 5.24 renamed the cache argument and output field from `past_key_values` to
`cache`; `CACHE_ARGUMENT` is the name the installed version uses, and forward takes either.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from moa.config import ModelConfig
from moa.layers.kv_cache import KVCache
from moa.layers.position import POSITION
from moa.models.language_model import LanguageModel, shared_parameters
from moa.models.weights_format import WEIGHTS_FORMAT, upgraded_config

MODEL_TYPE = "moa_metric"
CACHE_ARGUMENT = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                  else "past_key_values")


class MoaConfig(PreTrainedConfig):
    """`moa`: our `ModelConfig.to_dict()`; the usual transformers fields are derived from it."""

    model_type = MODEL_TYPE
    moa: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    moa_format_version: int | None = None  # what the weights mean (moa/models/weights_format.py)

    def __post_init__(self, **kwargs: Any) -> None:
        if self.moa:
            self.vocab_size = self.moa["vocab_size"]
            self.hidden_size = self.moa["d_model"]
            self.num_hidden_layers = self.moa["n_layers"]
            self.max_position_embeddings = self.moa["max_seq_len"]
            self.tie_word_embeddings = self.moa["tie_embeddings"]
        super().__post_init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> MoaConfig:
        return cls(moa=config.to_dict(), moa_format_version=WEIGHTS_FORMAT, **kwargs)

    def model_config(self) -> ModelConfig:
        # a config.json written before moa_format_version existed is format 1
        return ModelConfig.from_dict(upgraded_config(self.moa, self.moa_format_version or 1))


class MoaCache(Cache):
    """Our `KVCache` behind transformers' `Cache` API: one for the whole batch, or one per
    row when the batch is left-padded (`per_row`). `get_seq_length` counts the columns
    consumed, pads included, as `generate` expects."""

    def __init__(self, model: LanguageModel, batch_size: int, per_row: bool) -> None:
        super().__init__(layers=[])
        self.caches = [model.new_cache() for _ in range(batch_size if per_row else 1)]
        self.per_row = per_row
        self.rows = batch_size
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.caches[0].capacity

    @property
    def batch_size(self) -> int:
        return self.rows

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.caches = [KVCache(len(cache.layers), cache.capacity) for cache in self.caches]
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("MoaCache cannot be reordered: beam search (num_beams > 1) is not "
                         "supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("MoaCache cannot be cropped: assisted generation is not supported")


class MoaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # the conv windows and ALCCA's index cannot be rolled back

    def __init__(self, config: MoaConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(config.model_config())
        self._tied_weights_keys = shared_parameters(self)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own MoaCache on the first call

    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is self.model.position:
            fill_position_tables(module, self.model.config)
        else:
            self.model._init_weights(module)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: MoaCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None,
                past_key_values: MoaCache | None = None, **_: Any) -> CausalLMOutputWithPast:
        """input_ids (B, T) continuing `cache` (`past_key_values` before transformers 5.24);
        attention_mask (B, past + T), 0 at left padding. -> logits (B, T, V), 0 at padded
        positions."""
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if attention_mask is not None:
            _check_left_padding(attention_mask)
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("give the cache once: as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, MoaCache):
            raise TypeError(f"{CACHE_ARGUMENT} must be a MoaCache (made by this model's forward "
                            f"or generate), not {type(cache).__name__}")
        if cache is None and use_cache:
            cache = MoaCache(self.model, B, per_row=padded)
        if cache is not None and padded and not cache.per_row:
            raise ValueError("attention_mask has padding but the cache was started without: "
                             "start generation with the padded attention_mask")
        if (cache is not None and cache.per_row) or (cache is None and padded):
            keep = (attention_mask[:, -T:] if attention_mask is not None
                    else input_ids.new_ones(B, T)).bool()
            logits = self._per_row(input_ids, keep, cache)
        else:
            logits = self.model(input_ids, None if cache is None else cache.caches[0]).logits
        logits = logits.float()
        if cache is not None:
            cache.seen += T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_ARGUMENT: cache if use_cache else None})

    def _per_row(self, input_ids: torch.Tensor, keep: torch.Tensor,
                 cache: MoaCache | None) -> torch.Tensor:
        """Each row alone, its padding dropped: (B, T) -> logits (B, T, V)."""
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.model.config.vocab_size, device=input_ids.device)
        for row in range(B):
            tokens = input_ids[row, keep[row]][None]  # (1, T_row)
            if tokens.size(1):
                out = self.model(tokens, None if cache is None else cache.caches[row]).logits
                logits[row, keep[row]] = out[0].float()
        return logits


def fill_position_tables(position: torch.nn.Module, config: ModelConfig) -> None:
    """Non-persistent buffers (rope's tables) are not saved: from_pretrained leaves them
    empty and asks `_init_weights` to fill them, as our constructor computes them."""
    fresh = POSITION.build(config.position, config.max_seq_len, config.d_model,
                           config.head_dim)
    for name, buffer in fresh.named_buffers():
        getattr(position, name).copy_(buffer)


def _check_left_padding(attention_mask: torch.Tensor) -> None:
    """Zeros only before the first one of each row (left padding)."""
    mask = attention_mask.bool()
    if not bool((mask.cummax(dim=1).values == mask).all()):
        raise ValueError("attention_mask has padding after a token: only left padding is "
                         "supported (tokenizer.padding_side = 'left')")

