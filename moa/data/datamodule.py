"""The LightningDataModule: any registered data source behind train/val/test loaders."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from moa.data.source import CORPORA, DataConfig, LMSplits
from moa.data.tokenizer import TOKENIZERS, Tokenizer, TokenizerConfig
from moa.errors import ConfigError
from moa.schema import check


class LMDataModule(pl.LightningDataModule):
    """Batches of {"input_ids": (B, T), "labels": (B, T)} from `data`'s source.

    `prepare_data` builds and caches the corpus, tokenizer and packed tokens under
    `cache_dir` (cheap when cached); `setup` loads them. The train loader shuffles with a
    generator seeded by `seed`, so the batch order is a function of the seed.
    To evaluate with a run's tokenizer, pass `PretrainedConfig(path=RUN_DIR/tokenizer.json)`.
    """

    def __init__(
        self, data: DataConfig, tokenizer: TokenizerConfig | None, seed: int,
        cache_dir: str | Path,
    ) -> None:
        super().__init__()
        if data.uses_tokenizer and tokenizer is None:
            raise ConfigError("tokenizer", None, " | ".join(TOKENIZERS.names()),
                              f"data.name={data.name} is text and needs a tokenizer")
        self.data_config, self.tokenizer_config = data, tokenizer
        self.seed, self.cache_dir = seed, Path(cache_dir)
        self._splits: LMSplits | None = None

    def prepare_data(self) -> None:
        CORPORA.build(self.data_config, self.tokenizer_config, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        splits = CORPORA.build(self.data_config, self.tokenizer_config, self.cache_dir)
        train_blocks = len(splits.datasets["train"])
        check(train_blocks >= self.data_config.batch_size, "data.batch_size",
              self.data_config.batch_size, f"<= {train_blocks}",
              f"the train split has {train_blocks} blocks of {self.data_config.block_size} tokens")
        self._splits = splits

    @property
    def splits(self) -> LMSplits:
        if self._splits is None:
            raise RuntimeError("LMDataModule.setup() must run before its data is used")
        return self._splits

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.splits.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.splits.vocab_size

    @property
    def fingerprint(self) -> dict[str, Any]:
        """Corpus name and sha256, tokenizer sha256, tokens and blocks per split."""
        return self.splits.fingerprint

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.data_config.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.data_config.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.data_config.eval_batch_size, train=False)

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        """Training: shuffled by the seed, full batches only; evaluation: every block, in order."""
        workers = self.data_config.num_workers
        return DataLoader(
            self.splits.datasets[split], batch_size=batch_size, shuffle=train,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            drop_last=train, num_workers=workers, persistent_workers=workers > 0,
        )


def build_datamodule(
    data: Mapping[str, Any], tokenizer: Mapping[str, Any] | None, seed: int,
    cache_dir: str | Path,
) -> LMDataModule:
    """Parse the `data` and `tokenizer` config sections and make the DataModule."""
    tokenizer_config = None if tokenizer is None else TOKENIZERS.parse(tokenizer, "tokenizer")
    return LMDataModule(CORPORA.parse(data, "data"), tokenizer_config, seed, cache_dir)
