"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology.

Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models",
generator `multiquery_ar`. An example of length T with k key-value pairs:

    k1 v1 k2 v2 ... kk vk | x x k2 x x x k1 x ... x
    <-- 2k tokens ------>   <-- T - 2k tokens: queries at even offsets, x = filler -->

Keys are distinct draws from [1, V/2), values distinct draws from [V/2, V). Each key is
queried once, in the second part, at an even offset 2g, where the k distinct slots g are
drawn without replacement with P(g) proportional to (g + 1)^(power_a - 1) (power_a < 1 puts
queries close to the prefix). The label at a query key's position is its value; every
other label is -100 (ignored). Fillers are random tokens from [0, V) (as in Zoology, they
may coincide with keys) or 0.

Splits are generated in full at setup from the data seed, each split from its own derived
seed, with numpy operations over whole arrays (loops only over the k pairs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moa.data.source import CORPORA, SPLITS, DataConfig, LMSplits
from moa.data.tokenizer import TokenizerConfig
from moa.schema import check, check_range

IGNORE_INDEX = -100  # label of positions that are not scored (torch cross_entropy default)


@dataclass
class MQARConfig(DataConfig):
    name: str = "mqar"
    block_size: int = 64  # must equal seq_len (the YAML sets block_size: ${.seq_len})
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True  # filler tokens random (Zoology's default) or 0
    num_train_examples: int = 10_000
    num_val_examples: int = 1_000
    num_test_examples: int = 1_000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("num_kv_pairs", self.num_kv_pairs, 1)
        check(self.seq_len >= 4 * self.num_kv_pairs, "seq_len", self.seq_len,
              f">= 4 * num_kv_pairs = {4 * self.num_kv_pairs}", "the prefix holds 2 tokens per "
              "pair and each query needs its own pair of slots after it")
        check(self.vocab_size >= 2 * self.num_kv_pairs + 2, "vocab_size", self.vocab_size,
              f">= 2 * num_kv_pairs + 2 = {2 * self.num_kv_pairs + 2}",
              "keys are distinct tokens in [1, vocab_size/2), values in [vocab_size/2, vocab_size)")
        check_range("power_a", self.power_a, 0, low_open=True)
        check(self.block_size == self.seq_len, "block_size", self.block_size,
              f"= data.seq_len ({self.seq_len})", "an MQAR example is one block")
        for field in ("num_train_examples", "num_val_examples", "num_test_examples"):
            check_range(field, getattr(self, field), 1)

    @property
    def uses_tokenizer(self) -> bool:
        return False  # token ids are generated directly; vocab_size is this config's

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train_examples, "validation": self.num_val_examples,
                "test": self.num_test_examples}[split]


def multiquery_ar(
    config: MQARConfig, num_examples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`num_examples` examples: inputs (N, T) and labels (N, T), int64."""
    n, k, length, vocab = num_examples, config.num_kv_pairs, config.seq_len, config.vocab_size
    keys = _distinct_draws(rng, 1, vocab // 2, n, k)  # (N, k)
    values = _distinct_draws(rng, vocab // 2, vocab, n, k)  # (N, k)
    prefix = 2 * k
    inputs = np.zeros((n, length), dtype=np.int64)
    inputs[:, 0:prefix:2], inputs[:, 1:prefix:2] = keys, values

    # Query slots: Gumbel top-k of log P(g) draws k slots without replacement, in draw order,
    # exactly like Zoology's np.random.choice(slots, k, replace=False, p=P).
    slots = (length - prefix) // 2
    log_p = (config.power_a - 1) * np.log(np.arange(1, slots + 1))  # (S,)
    scores = log_p + rng.gumbel(size=(n, slots))  # (N, S)
    gaps = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k)
    positions = prefix + 2 * gaps  # (N, k), all <= T - 2
    np.put_along_axis(inputs, positions, keys, axis=1)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, positions, values, axis=1)

    if config.random_non_queries:
        filler = inputs == 0  # keys and values are never 0
        inputs[filler] = rng.integers(0, vocab, size=int(filler.sum()))
    return inputs, labels


def _distinct_draws(
    rng: np.random.Generator, low: int, high: int, n: int, k: int
) -> np.ndarray:
    """(n, k) ints from [low, high), distinct within each row, uniformly random order.

    Floyd's sampling, vectorised over rows: k steps whatever the range, no rejection.
    """
    population = high - low
    chosen = np.empty((n, k), dtype=np.int64)
    for step, top in enumerate(range(population - k, population)):
        draw = rng.integers(0, top + 1, size=n)  # (n,)
        taken = (chosen[:, :step] == draw[:, None]).any(axis=1)
        chosen[:, step] = np.where(taken, top, draw)
    return low + rng.permuted(chosen, axis=1)


class MQARDataset(Dataset):
    """Pre-generated examples: {"input_ids": (T,), "labels": (T,), "scored_positions": (k,)}.

    `scored_positions` are the k query positions, the only labelled ones, in increasing
    order: the training module computes logits there only (`LanguageModel.forward`'s
    `output_positions`), skipping the vocabulary projection of the T - k others."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        self.inputs, self.labels = torch.from_numpy(inputs), torch.from_numpy(labels)
        scored = self.labels != IGNORE_INDEX  # (N, T), k per row
        self.scored_positions = scored.nonzero()[:, 1].view(len(labels), -1)  # (N, k)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[index], "labels": self.labels[index],
                "scored_positions": self.scored_positions[index]}


@CORPORA.register("mqar", MQARConfig)
def build_mqar(config: MQARConfig, tokenizer: TokenizerConfig | None, cache_dir: Path) -> LMSplits:
    """The three splits; needs no tokenizer (any tokenizer config is ignored) nor cache."""
    digest = hashlib.sha256()
    splits = {}
    for index, split in enumerate(SPLITS):
        rng = np.random.default_rng([config.seed, index])
        inputs, labels = multiquery_ar(config, config.num_examples(split), rng)
        digest.update(inputs.tobytes() + labels.tobytes())
        splits[split] = MQARDataset(inputs, labels)
    fingerprint = {
        "corpus": "mqar",
        "corpus_sha256": digest.hexdigest(),
        "tokenizer_sha256": None,
        "tokens": {split: len(splits[split]) * config.seq_len for split in SPLITS},
        "blocks": {split: len(splits[split]) for split in SPLITS},
    }
    return LMSplits(splits, None, config.vocab_size, fingerprint)
