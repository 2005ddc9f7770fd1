"""A text corpus (train/validation/test documents) and how it becomes token splits.

Every text source (`corpora.py`) loads its documents and calls `make_corpus`, which keeps
one `text` column, drops empty documents, carves missing validation/test splits from the
train documents and hashes the result; `token_splits` then trains or loads the tokenizer
on the train split and packs each split into fixed-length blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from moa.data.packing import ENCODE_BATCH, BlockDataset, packed_tokens
from moa.data.source import SPLITS, DataConfig, LMSplits
from moa.data.tokenizer import TOKENIZERS, TokenizerConfig
from moa.errors import ConfigError
from moa.schema import check


@dataclass
class Corpus:
    name: str
    splits: dict[str, datasets.Dataset]  # SPLITS -> documents in one "text" column
    sha256: str  # of every split's documents: identifies exactly what the model sees


@contextmanager
def _without_progress_bars() -> Iterator[None]:
    """datasets' progress bars off for a moment's work (filtering out empty documents draws
    one bar a split on every start, cached or not); HF_DATASETS_DISABLE_PROGRESS_BARS set
    either way is left to decide."""
    if (datasets.are_progress_bars_disabled()
            or datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None):
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def documents(
    dataset: datasets.Dataset, text_field: str, key: str, source: Any
) -> datasets.Dataset:
    """`dataset`'s non-empty documents in one `text` column; none -> ConfigError `key=source`."""
    if text_field not in dataset.column_names:
        raise ConfigError("data.text_field", text_field, " | ".join(dataset.column_names),
                          "no such column")
    if getattr(dataset.features[text_field], "dtype", None) not in ("string", "large_string"):
        raise ConfigError("data.text_field", text_field, "a column of strings",
                          f"column type is {dataset.features[text_field]}")
    dataset = dataset.select_columns([text_field])
    if text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    with _without_progress_bars():
        dataset = dataset.filter(
            lambda texts: [bool(text and text.strip()) for text in texts],
            input_columns="text", batched=True,
        )
    check(len(dataset) > 0, key, source, "a source with at least one document",
          "no non-empty text found")
    return dataset


def make_corpus(
    name: str, splits: dict[str, datasets.Dataset], config: DataConfig, key: str, source: Any
) -> Corpus:
    """A corpus from `splits` (documents; "train" required), carving the missing splits.

    `key=source` is the config entry that named the train data, for error messages.
    """
    missing = [split for split in SPLITS if split not in splits]
    if missing:
        splits = {**splits, **carve(splits["train"], missing, config, key, source)}
    return Corpus(name, splits, corpus_sha256(splits))


def carve(
    train: datasets.Dataset, missing: list[str], config: DataConfig, key: str, source: Any
) -> dict[str, datasets.Dataset]:
    """Split train documents into the `missing` splits and the rest, by the data seed.

    A shuffled index order (numpy Generator seeded by `config.seed`) assigns
    `val_fraction` / `test_fraction` of the documents (at least one each) to validation /
    test; every split keeps its documents in corpus order.
    """
    n = len(train)
    fractions = {"validation": config.val_fraction, "test": config.test_fraction}
    sizes = [max(1, int(n * fractions[split])) for split in missing]
    if n - sum(sizes) < 1:
        raise ConfigError(
            key, source, f"a train split of at least {len(missing) + 1} "
            "documents to carve validation/test from: set data.sample_by=paragraph (or line), "
            "or give explicit validation/test data", f"the train split has {n} document(s)",
        )
    order = np.random.default_rng(config.seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    carved = {split: train.select(np.sort(order[lo:hi]))
              for split, lo, hi in zip(missing, bounds[:-1], bounds[1:], strict=True)}
    carved["train"] = train.select(np.sort(order[bounds[-1]:]))
    return carved


def corpus_sha256(splits: dict[str, datasets.Dataset]) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(f"\0{split}\0".encode())
        for batch in splits[split].iter(batch_size=ENCODE_BATCH):
            for text in batch["text"]:
                digest.update(text.encode() + b"\0")
    return digest.hexdigest()


def token_splits(
    corpus: Corpus, config: DataConfig, tokenizer_config: TokenizerConfig, cache_dir: Path
) -> LMSplits:
    """Tokenizer (trained on the train split) and block datasets for `corpus`, all cached."""
    cache_dir = Path(cache_dir)
    train_texts = (text for batch in corpus.splits["train"].iter(batch_size=ENCODE_BATCH)
                   for text in batch["text"])  # consumed only if the tokenizer must be trained
    tokenizer = TOKENIZERS.build(tokenizer_config, train_texts, corpus.sha256, cache_dir)
    folder = cache_dir / "packed" / f"{corpus.name}-{corpus.sha256[:16]}-{tokenizer.sha256[:16]}"
    tokens = {split: packed_tokens(corpus.splits[split], tokenizer, folder / f"{split}.npy")
              for split in SPLITS}
    for split, array in tokens.items():
        check(len(array) > config.block_size, "data.block_size", config.block_size,
              f"<= {len(array) - 1}", f"the {split} split has only {len(array)} tokens")
    blocks = {split: BlockDataset(tokens[split], config.block_size) for split in SPLITS}
    fingerprint = {
        "corpus": corpus.name,
        "corpus_sha256": corpus.sha256,
        "tokenizer_sha256": tokenizer.sha256,
        "documents": {split: len(corpus.splits[split]) for split in SPLITS},
        "tokens": {split: len(tokens[split]) for split in SPLITS},
        "blocks": {split: len(blocks[split]) for split in SPLITS},
    }
    return LMSplits(blocks, tokenizer, tokenizer.vocab_size, fingerprint)
