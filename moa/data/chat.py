"""`data=chat`: conversations, rendered with the chat template, loss on the model's text.

Conversations come from JSON / JSONL files (`data.files`) or a Hugging Face dataset
(`data.path`: a hub name or a local folder), in one of two forms (`data.format`):

    messages: {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]}
    alpaca:   {"instruction": "...", "input": "..." (optional), "output": "..."}

An alpaca record is one user turn (the instruction, then a blank line and the input when
there is one) and one assistant turn (the output). Each conversation is rendered with the
template the exported tokenizer carries (moa/data/chat_template.py) and tokenized as one
text, so the ids are those `apply_chat_template` gives. Labels are the next token where
the model writes it (assistant text and its `<|eos|>`, think and reasoning segments) and
-100 elsewhere, so training, validation and test loss are all on the assistant's tokens.

One conversation is one example, right-padded with `<|pad|>` to `block_size` (pads carry
no loss): no token ever attends to another conversation, and with causal attention the
pads after a conversation change none of its logits. A conversation longer than a block is
truncated to its first block (`too_long: truncate`) or dropped (`drop`); either way, and for
every conversation skipped for having no assistant turn, the counts are logged and kept in
run.json's data fingerprint. Validation and test conversations are carved from the
conversations by the data seed (`val_fraction`, `test_fraction`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

from moa.data.chat_template import ROLES, render, render_segments
from moa.data.corpus import carve
from moa.data.source import CORPORA, SPLITS, DataConfig, LMSplits
from moa.data.tokenizer import TOKENIZERS, Tokenizer, TokenizerConfig
from moa.errors import ConfigError
from moa.schema import check, check_choice

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # labels that carry no loss (torch cross_entropy's default)
Message = dict[str, str]


@dataclass
class ChatConfig(DataConfig):
    name: str = "chat"
    files: Any = None  # a glob or a list of globs of .json (a list of records) / .jsonl files
    path: str | None = None  # or a Hugging Face dataset: hub name (downloads) or local folder
    split: str = "train"  # the dataset's split read with `path`
    format: str = "messages"  # messages | alpaca
    messages_field: str = "messages"  # the record's list of {role, content} (format=messages)
    too_long: str = "truncate"  # a conversation longer than block_size: truncate | drop

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.files, str):
            self.files = [self.files]
        check(self.files is None or (isinstance(self.files, list) and all(
            isinstance(f, str) for f in self.files)), "files", self.files,
            "a glob or a list of globs")
        check((self.files is None) != (self.path is None), "files", self.files,
              "data.files=[...] or data.path=DATASET, exactly one",
              "both given" if self.files else "neither given")
        check_choice("format", self.format, ("messages", "alpaca"))
        check_choice("too_long", self.too_long, ("truncate", "drop"))


def read_records(config: ChatConfig, cache_dir: Path) -> list[tuple[dict, str]]:
    """(record, where it came from: `file:line` or `dataset[index]`) for every record."""
    if config.path is not None:
        try:
            loaded = datasets.load_dataset(config.path, cache_dir=str(cache_dir / "hf_datasets"))
        except (FileNotFoundError, ConnectionError, ValueError) as error:
            raise ConfigError("data.path", config.path, "a hub dataset name or a local folder",
                              str(error).splitlines()[0] if str(error) else type(error).__name__
                              ) from None
        check(config.split in loaded, "data.split", config.split, " | ".join(loaded),
              "no such split")
        return [(record, f"{config.path}[{index}]")
                for index, record in enumerate(loaded[config.split])]
    records = []
    for pattern in config.files:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        check(bool(matches), "data.files", pattern, "a path or glob matching at least one file",
              "no such file")
        for file in matches:
            records += _read_json_file(Path(file))
    return records


def _read_json_file(path: Path) -> list[tuple[dict, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as error:
                raise ConfigError("data.files", f"{path}:{number}", "JSON lines (one record a "
                                  "line)", f"malformed JSON: {error.msg}") from None
        return records
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("data.files", f"{path}:{error.lineno}", "a JSON list of records",
                          f"malformed JSON: {error.msg}") from None
    check(isinstance(loaded, list), "data.files", str(path), "a JSON list of records (or a "
          ".jsonl file)", f"the file holds a {type(loaded).__name__}")
    return [(record, f"{path}[{index}]") for index, record in enumerate(loaded)]


def conversation(record: Any, config: ChatConfig, where: str) -> list[Message]:
    """The record's messages; a record of the wrong shape or an unknown role is an error."""
    key = "data.path" if config.path is not None else "data.files"
    if not isinstance(record, dict):
        raise ConfigError(key, where, f"records in {config.format} form",
                          f"a {type(record).__name__}, not an object")
    if config.format == "alpaca":
        fields = [record.get(name) for name in ("instruction", "input", "output")]
        check(isinstance(fields[0], str) and isinstance(fields[2], str)
              and isinstance(fields[1], str | None), key, where,
              "alpaca records with string instruction, output and optional input")
        instruction, extra, output = fields
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    messages = record.get(config.messages_field)
    check(isinstance(messages, list), key, where,
          f"records with a list of messages under {config.messages_field!r}")
    for message in messages:
        check(isinstance(message, dict) and isinstance(message.get("content"), str)
              and isinstance(message.get("role"), str), key, where,
              "messages {role: str, content: str}")
        if message["role"] not in ROLES:
            raise ConfigError(key, where, f"roles {', '.join(ROLES)}",
                              f"unknown role {message['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def has_reply(messages: list[Message]) -> bool:
    return any(m["role"] == "assistant" and m["content"] for m in messages)


def encode_conversation(tokenizer: Tokenizer,
                        messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, written by the model) of the rendered conversation, (N,) each.

    The text is tokenized whole, as `apply_chat_template` does; a token is the model's when
    it starts inside a piece the model writes (pieces meet at special tokens, which the
    tokenizer never merges across)."""
    pieces = render_segments(messages)
    ids, offsets = tokenizer.encode_with_offsets("".join(text for text, _ in pieces))
    bounds = np.cumsum([0] + [len(text) for text, _ in pieces])  # piece i: [b_i, b_{i+1})
    model_piece = np.array([written for _, written in pieces])
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    written = model_piece[np.searchsorted(bounds, starts, side="right") - 1]
    return np.asarray(ids, dtype=np.int64), written


class ChatDataset(Dataset):
    """One conversation per example: {"input_ids": (T,), "labels": (T,)} right-padded."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        self.inputs, self.labels = torch.from_numpy(inputs), torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[index], "labels": self.labels[index]}


def examples(encoded: list[tuple[np.ndarray, np.ndarray]], block_size: int, pad_id: int,
             too_long: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Inputs and labels (N, T) of the conversations that fit, and what happened to the rest.

    Conversation tokens t_0..t_n: inputs t_0..t_{n-1}, labels t_1..t_n where the model
    writes them; a conversation of more than T + 1 tokens is cut to its first T + 1
    (truncate) or dropped; one left with no labelled token is dropped."""
    inputs = np.full((len(encoded), block_size), pad_id, dtype=np.int64)
    labels = np.full((len(encoded), block_size), IGNORE_INDEX, dtype=np.int64)
    counts = {"truncated": 0, "dropped_too_long": 0, "dropped_no_reply_in_block": 0}
    kept = 0
    for ids, written in encoded:
        if len(ids) > block_size + 1:
            if too_long == "drop":
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += 1
            ids, written = ids[: block_size + 1], written[: block_size + 1]
        targets = np.where(written[1:], ids[1:], IGNORE_INDEX)
        if (targets == IGNORE_INDEX).all():
            counts["dropped_no_reply_in_block"] += 1
            continue
        inputs[kept, : len(ids) - 1], labels[kept, : len(ids) - 1] = ids[:-1], targets
        kept += 1
    return inputs[:kept], labels[:kept], counts


def blocked_splits(encoded: dict[str, list], config: ChatConfig,
                   pad_id: int, fingerprint: dict[str, Any], unit: str) -> dict[str, ChatDataset]:
    """Each split's encoded conversations cut into blocks (`examples`) -> a ChatDataset per
    split; `fingerprint` gains, per split, its tokens, blocks, labelled tokens and the counts
    of `examples` (truncated, dropped). A split with no block is refused, naming
    data.block_size (`unit`: what a block must hold, for the message)."""
    splits = {}
    for split, items in encoded.items():
        inputs, labels, counts = examples(items, config.block_size, pad_id, config.too_long)
        check(len(inputs) > 0, "data.block_size", config.block_size,
              f"a block that holds at least one {unit}", f"the {split} split has none")
        splits[split] = ChatDataset(inputs, labels)
        sizes = {"tokens": int((inputs != pad_id).sum()), "blocks": len(inputs),
                 "labelled_tokens": int((labels != IGNORE_INDEX).sum()), **counts}
        for name, value in sizes.items():
            fingerprint.setdefault(name, {})[split] = value
        log.info("%s %s: %s", fingerprint["corpus"], split,
                 ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in sizes.items()))
    return splits


@CORPORA.register("chat", ChatConfig)
def build_chat(config: ChatConfig, tokenizer_config: TokenizerConfig | None,
               cache_dir: Path) -> LMSplits:
    cache_dir = Path(cache_dir)
    conversations, skipped = [], 0
    for record, where in read_records(config, cache_dir):
        messages = conversation(record, config, where)
        if has_reply(messages):
            conversations.append(messages)
        else:
            skipped += 1
    source = config.path or config.files
    check(len(conversations) > 0, "data.path" if config.path else "data.files", source,
          "conversations with at least one assistant turn", f"none found ({skipped} without)")
    index = datasets.Dataset.from_dict({"index": list(range(len(conversations)))})
    key = "data.path" if config.path else "data.files"
    parts = carve(index, ["validation", "test"], config, key, source)
    split_conversations = {split: [conversations[i] for i in parts[split]["index"]]
                           for split in SPLITS}
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(f"\0{split}\0".encode())
        for messages in split_conversations[split]:
            digest.update(json.dumps(messages, sort_keys=True).encode() + b"\0")
    corpus_sha256 = digest.hexdigest()
    tokenizer = TOKENIZERS.build(tokenizer_config, (render(m) for m in
                                                    split_conversations["train"]),
                                 corpus_sha256, cache_dir)
    fingerprint = {"corpus": "chat", "corpus_sha256": corpus_sha256,
                   "tokenizer_sha256": tokenizer.sha256, "skipped_no_assistant_turn": skipped}
    encoded = {split: [encode_conversation(tokenizer, m) for m in split_conversations[split]]
               for split in SPLITS}
    splits = blocked_splits(encoded, config, tokenizer.pad_id, fingerprint, "reply")
    log.info("chat: %d conversations without an assistant turn skipped", skipped)
    return LMSplits(splits, tokenizer, tokenizer.vocab_size, fingerprint)
