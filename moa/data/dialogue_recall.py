"""`data=dialogue_recall`: a synthetic conversation task that only a memory can solve.

A conversation has `num_turns` interactions `[Q] query [A] answer <|eos|>`. Every query
states `facts_per_turn` new facts (`the cat is red .`); from turn 1 on it also asks for a
fact stated d turns before (`what is the dog ?`, answer `blue`), d drawn uniformly from
1..min(t, max_distance); turn 0's answer is `ok`. Keys and values are distinct within a
conversation and drawn from disjoint word lists, so the answer is never in the current
message: a model that reads one message at a time must carry the facts in its memory.
Everything is drawn from the data seed (one generator per split).

The labels are the answer's tokens and its `<|eos|>` (next-token, -100 elsewhere). Each
example carries, beside `input_ids` and `labels`, the `turn` of every position and the
`distance` of every turn's question (0: no question), so accuracy can be scored by turn
and by distance (moa/training/objectives/scores.py). `view` lays the conversations out:

    conversation  one conversation an example: input_ids, labels, turn (N, L); distance (N,)
                  where L = block_size, each turn right-padded: the Reactive Transformer
    current       one turn an example (L,): a decoder that sees only the current message
    history       one conversation an example, its turns back to back (block_size,): a
                  decoder that re-reads the whole history
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from moa.data.interactions import InteractionEncoder
from moa.data.source import CORPORA, SPLITS, DataConfig, LMSplits
from moa.data.tokenizer import TOKENIZERS, TokenizerConfig
from moa.schema import check, check_choice, check_range

IGNORE_INDEX = -100
VIEWS = ("conversation", "current", "history")
KEYS = ["cat", "dog", "bird", "fish", "ball", "tree", "car", "house", "book", "cup", "hat",
        "box", "boat", "cake", "door", "kite", "lamp", "bed", "toy", "shoe", "sun", "moon",
        "frog", "duck"]
VALUES = ["red", "blue", "green", "yellow", "pink", "brown", "black", "white", "big", "small",
          "happy", "sad", "soft", "hard", "hot", "cold", "fast", "slow", "old", "new", "tall",
          "short", "wet", "dry"]


@dataclass
class DialogueRecallConfig(DataConfig):
    name: str = "dialogue_recall"
    block_size: int = 32  # tokens a turn (views conversation, current) or a conversation (history)
    view: str = "conversation"  # conversation | current | history (see the module docstring)
    num_turns: int = 8
    facts_per_turn: int = 1
    max_distance: int | None = None  # None: any earlier turn
    keys: list[str] = field(default_factory=lambda: list(KEYS))
    values: list[str] = field(default_factory=lambda: list(VALUES))
    num_train_conversations: int = 4000
    num_val_conversations: int = 200
    num_test_conversations: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("view", self.view, VIEWS)
        check_range("num_turns", self.num_turns, 2)
        check_range("facts_per_turn", self.facts_per_turn, 1)
        check(self.max_distance is None or 1 <= self.max_distance < self.num_turns,
              "max_distance", self.max_distance, f"1..{self.num_turns - 1} or null")
        facts = self.num_turns * self.facts_per_turn
        for name in ("keys", "values"):
            words = getattr(self, name)
            check(len(set(words)) == len(words) and all(w and w.split() == [w] for w in words),
                  name, words, "distinct single words")
            check(len(words) >= facts, name, f"{len(words)} words",
                  f">= num_turns * facts_per_turn = {facts}",
                  "each fact of a conversation has its own key and value")
        check(not set(self.keys) & set(self.values), "values", sorted(set(self.keys)
              & set(self.values)), "words that are not keys", "keys and values overlap")
        for split in SPLITS:
            check_range(self._count_field(split), self.num_conversations(split), 1)

    def num_conversations(self, split: str) -> int:
        return getattr(self, self._count_field(split))

    @staticmethod
    def _count_field(split: str) -> str:
        return {"train": "num_train_conversations", "validation": "num_val_conversations",
                "test": "num_test_conversations"}[split]


@dataclass
class Conversation:
    """Word-level conversation: per turn the query's and the answer's words, and d."""

    queries: list[list[str]]
    answers: list[list[str]]
    distances: list[int]


def conversations(config: DialogueRecallConfig, count: int,
                  rng: np.random.Generator) -> list[Conversation]:
    made = []
    facts = config.num_turns * config.facts_per_turn
    for _ in range(count):
        keys = rng.choice(config.keys, facts, replace=False).tolist()
        values = rng.choice(config.values, facts, replace=False).tolist()
        queries, answers, distances = [], [], []
        for turn in range(config.num_turns):
            stated = range(turn * config.facts_per_turn, (turn + 1) * config.facts_per_turn)
            words = [w for i in stated for w in ("the", keys[i], "is", values[i], ".")]
            if turn == 0:
                queries.append(words), answers.append(["ok"]), distances.append(0)
                continue
            distance = int(rng.integers(1, min(turn, config.max_distance or turn) + 1))
            asked = (turn - distance) * config.facts_per_turn + int(
                rng.integers(config.facts_per_turn))
            queries.append(words + ["what", "is", "the", keys[asked], "?"])
            answers.append([values[asked]])
            distances.append(distance)
        made.append(Conversation(queries, answers, distances))
    return made


def encode_turns(conversation: Conversation, encode: InteractionEncoder, length: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and labels (N, length): turn tokens t_0..t_{n-1}, labels t_1..t_n where
    the model writes them, right-padded; a turn longer than `length` + 1 is an error."""
    turns = len(conversation.queries)
    inputs = np.full((turns, length), encode.tokenizer.pad_id, dtype=np.int64)
    labels = np.full((turns, length), IGNORE_INDEX, dtype=np.int64)
    for t, (query, answer) in enumerate(zip(conversation.queries, conversation.answers,
                                            strict=True)):
        ids, written = encode(" ".join(query), " ".join(answer))
        check(len(ids) - 1 <= length, "data.block_size", length,
              f">= {len(ids) - 1} (the longest turn)", "a turn does not fit")
        inputs[t, :len(ids) - 1] = ids[:-1]
        labels[t, :len(ids) - 1] = np.where(written[1:], ids[1:], IGNORE_INDEX)
    return inputs, labels


class DialogueRecallDataset(Dataset):
    """Examples of one `view` over encoded conversations (C, N, L) and their distances (C, N)."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, distances: np.ndarray,
                 view: str, pad_id: int, block_size: int) -> None:
        count, turns, length = inputs.shape
        turn = np.broadcast_to(np.arange(turns)[None, :, None], inputs.shape)
        self.distance = torch.from_numpy(distances)  # (C, N)
        if view == "conversation":
            self.inputs, self.labels = torch.from_numpy(inputs), torch.from_numpy(labels)
            self.turn, self.conversation = torch.from_numpy(turn.copy()), torch.arange(count)
        elif view == "current":
            self.inputs = torch.from_numpy(inputs.reshape(-1, length))
            self.labels = torch.from_numpy(labels.reshape(-1, length))
            self.turn = torch.from_numpy(turn.reshape(-1, length).copy())
            self.conversation = torch.arange(count).repeat_interleave(turns)
        else:
            self.inputs, self.labels, self.turn = _back_to_back(inputs, labels, turn, pad_id,
                                                                block_size)
            self.conversation = torch.arange(count)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[index], "labels": self.labels[index],
                "turn": self.turn[index], "distance": self.distance[self.conversation[index]]}


def _back_to_back(inputs: np.ndarray, labels: np.ndarray, turn: np.ndarray, pad_id: int,
                  block_size: int) -> tuple[torch.Tensor, ...]:
    """Each conversation's turns without their padding, one after another, right-padded to
    `block_size`: (C, block_size) input_ids, labels and turn (-1 on padding)."""
    real = inputs != pad_id  # (C, N, L); pads only ever follow a turn's tokens
    longest = int(real.sum(axis=(1, 2)).max())
    check(longest <= block_size, "data.block_size", block_size,
          f">= {longest} (the longest conversation; view=history)", "a conversation does not fit")
    out = [np.full((len(inputs), block_size), fill, dtype=np.int64)
           for fill in (pad_id, IGNORE_INDEX, -1)]
    for row in range(len(inputs)):
        mask = real[row]
        for array, source in zip(out, (inputs, labels, turn), strict=True):
            array[row, :mask.sum()] = source[row][mask]
    return tuple(torch.from_numpy(array) for array in out)


@CORPORA.register("dialogue_recall", DialogueRecallConfig)
def build_dialogue_recall(config: DialogueRecallConfig, tokenizer_config: TokenizerConfig,
                          cache_dir) -> LMSplits:
    made = {split: conversations(config, config.num_conversations(split),
                                 np.random.default_rng([config.seed, index]))
            for index, split in enumerate(SPLITS)}
    digest = hashlib.sha256()
    for split in SPLITS:
        for c in made[split]:
            digest.update(repr((c.queries, c.answers, c.distances)).encode())
    texts = (" ".join(["[Q]", *q, "[A]", *a]) for c in made["train"]
             for q, a in zip(c.queries, c.answers, strict=True))
    tokenizer = TOKENIZERS.build(tokenizer_config, texts, digest.hexdigest(), cache_dir)
    encode = InteractionEncoder(tokenizer)
    splits, fingerprint = {}, {"corpus": "dialogue_recall", "corpus_sha256": digest.hexdigest(),
                               "tokenizer_sha256": tokenizer.sha256, "tokens": {}, "blocks": {}}
    for split in SPLITS:
        # history: turns are packed back to back, so each is first padded to the longest only
        length = config.block_size if config.view != "history" else max(
            len(encode(" ".join(q), " ".join(a))[0]) - 1 for c in made[split]
            for q, a in zip(c.queries, c.answers, strict=True))
        encoded = [encode_turns(c, encode, length) for c in made[split]]
        inputs = np.stack([turn_inputs for turn_inputs, _ in encoded])  # (C, N, L)
        labels = np.stack([turn_labels for _, turn_labels in encoded])
        distances = np.array([c.distances for c in made[split]], dtype=np.int64)  # (C, N)
        dataset = DialogueRecallDataset(inputs, labels, distances, config.view,
                                        tokenizer.pad_id, config.block_size)
        splits[split] = dataset
        fingerprint["tokens"][split] = int((inputs != tokenizer.pad_id).sum())
        fingerprint["blocks"][split] = len(dataset)
    return LMSplits(splits, tokenizer, tokenizer.vocab_size, fingerprint)
