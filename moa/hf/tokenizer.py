"""Our tokenizer.json as a transformers tokenizer, for the exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from moa.data.chat_template import CHAT_TEMPLATE
from moa.data.tokenizer import SPECIAL_TOKENS


def hf_tokenizer(path: Path, **named: Any) -> PreTrainedTokenizerFast | None:
    """Our tokenizer.json with its special tokens named (and `named`, e.g. mask_token) and
    the chat template; None for a run without a tokenizer (mqar's synthetic tokens)."""
    if not path.is_file():
        return None
    bos, eos, pad, unk, *roles = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        additional_special_tokens=roles, chat_template=CHAT_TEMPLATE, padding_side="left",
        model_input_names=["input_ids", "attention_mask"], **named)
