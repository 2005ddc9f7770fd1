"""`data=interactions`: single `[Q] query [A] answer` interactions, the Reactive
Transformer's interaction SFT data (stage 2), from conversation files.

Records are read as `data=chat` reads them (moa/data/chat.py: `data.files` or `data.path`,
`format: messages | alpaca`); each user message followed by an assistant message is one
interaction, whatever came before it: Reactive AI's SFT interactions need not be
connected. An interaction's ids are `[Q]` + the query + `[A]` + the answer + `<|eos|>`;
the labels are the answer's tokens and its end. One interaction an example, right-padded
to `block_size`; longer ones are truncated or dropped (`too_long`), as chat's conversations.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import datasets
import numpy as np

from moa.data.chat import ChatConfig, blocked_splits, conversation, read_records
from moa.data.corpus import carve
from moa.data.source import CORPORA, SPLITS, LMSplits
from moa.data.tokenizer import TOKENIZERS, Tokenizer, TokenizerConfig
from moa.errors import ConfigError
from moa.schema import check

log = logging.getLogger(__name__)
QUERY, ANSWER = "[Q]", "[A]"


class InteractionEncoder:
    """Token ids of `[Q] query [A] answer <|eos|>` and which of them the model writes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {token: tokenizer.token_to_id(token) for token in (QUERY, ANSWER)}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ConfigError("tokenizer.special_tokens", missing, f"{QUERY} and {ANSWER} among "
                              "them (tokenizer=rxt_bpe has them)",
                              "interactions are [Q] query [A] answer")
        self.tokenizer, self.query_id, self.answer_id = tokenizer, ids[QUERY], ids[ANSWER]

    def __call__(self, query: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
        head = [self.query_id, *self.tokenizer.encode(" " + query), self.answer_id]
        tail = [*self.tokenizer.encode(" " + answer), self.tokenizer.eos_id]
        written = np.array([False] * len(head) + [True] * len(tail))
        return np.array(head + tail, dtype=np.int64), written


@dataclass
class InteractionsConfig(ChatConfig):
    name: str = "interactions"


def interaction_pairs(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(query, answer) of each user message directly followed by an assistant message."""
    return [(first["content"], second["content"])
            for first, second in pairwise(messages)
            if first["role"] == "user" and second["role"] == "assistant" and second["content"]]


@CORPORA.register("interactions", InteractionsConfig)
def build_interactions(config: InteractionsConfig, tokenizer_config: TokenizerConfig,
                       cache_dir: Path) -> LMSplits:
    cache_dir = Path(cache_dir)
    pairs = [pair for record, where in read_records(config, cache_dir)
             for pair in interaction_pairs(conversation(record, config, where))]
    key, source = ("data.path", config.path) if config.path else ("data.files", config.files)
    check(len(pairs) > 0, key, source, "records with a user message answered by the assistant",
          "none found")
    index = datasets.Dataset.from_dict({"index": list(range(len(pairs)))})
    parts = carve(index, ["validation", "test"], config, key, source)
    split_pairs = {split: [pairs[i] for i in parts[split]["index"]] for split in SPLITS}
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(f"\0{split}\0".encode())
        for query, answer in split_pairs[split]:
            digest.update(f"{query}\0{answer}\0".encode())
    texts = (f"{QUERY} {query} {ANSWER} {answer}" for query, answer in split_pairs["train"])
    tokenizer = TOKENIZERS.build(tokenizer_config, texts, digest.hexdigest(), cache_dir)
    encode = InteractionEncoder(tokenizer)
    fingerprint = {"corpus": "interactions", "corpus_sha256": digest.hexdigest(),
                   "tokenizer_sha256": tokenizer.sha256}
    encoded = {split: [encode(query, answer) for query, answer in split_pairs[split]]
               for split in SPLITS}
    splits = blocked_splits(encoded, config, tokenizer.pad_id, fingerprint, "answer")
    return LMSplits(splits, tokenizer, tokenizer.vocab_size, fingerprint)
