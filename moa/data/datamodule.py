"""The LightningDataModule: any registered data source behind train/val/test loaders."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from moa.data.sampler import ResumableLoader, ResumableSampler
from moa.data.source import CORPORA, DataConfig, LMSplits
from moa.data.tokenizer import TOKENIZERS, Tokenizer, TokenizerConfig
from moa.errors import ConfigError
from moa.schema import check


class LMDataModule(pl.LightningDataModule):
    """Batches of {"input_ids": (B, T), "labels": (B, T)} from `data`'s source.

    `prepare_data` builds and caches the corpus, tokenizer and packed tokens under
    `cache_dir` (cheap when cached); `setup` loads them. The train loader's order is a
    function of (seed, epoch) (`ResumableSampler`); checkpoints hold where in it training
    stands (the loader's `state_dict`), so a resumed run continues the order without
    repeating batches.
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
        self._resume: tuple[int, int] | None = None  # from a checkpoint's datamodule state

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
        batch_size = self.data_config.batch_size
        sampler = ResumableSampler(self.splits.datasets["train"], self.seed, batch_size)
        if self._resume is not None:
            sampler.resume_at(*self._resume)
        return self._loader("train", batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.data_config.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.data_config.eval_batch_size)

    def _loader(self, split: str, batch_size: int,
                sampler: ResumableSampler | None = None) -> DataLoader:
        """Training: the sampler's order, full batches only; evaluation: every block, in order.
        Each loader has its own generator: starting an iteration would otherwise draw from the
        global RNG, which a resumed run must find where the interrupted one left it."""
        workers = self.data_config.num_workers
        options = dict(batch_size=batch_size, num_workers=workers,
                       persistent_workers=workers > 0,
                       generator=torch.Generator().manual_seed(self.seed))
        if sampler is None:
            return DataLoader(self.splits.datasets[split], **options)
        return ResumableLoader(self.splits.datasets[split], sampler=sampler,
                               position=self._training_position, drop_last=True, **options)

    def _training_position(self) -> tuple[int, int]:
        """(epoch, batches consumed) of the training loop; the next epoch's start once an
        epoch's batches are all consumed."""
        epoch = self.trainer.current_epoch
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= self.trainer.num_training_batches:
            epoch, batches = epoch + 1, 0
        return epoch, batches

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """The position as checkpoints written before the train loader kept it stored it
        (under the datamodule's key); the train loader built next starts there."""
        if state_dict:
            self._resume = (state_dict["epoch"], state_dict["batches"])


def build_datamodule(
    data: Mapping[str, Any], tokenizer: Mapping[str, Any] | None, seed: int,
    cache_dir: str | Path,
) -> LMDataModule:
    """Parse the `data` and `tokenizer` config sections and make the DataModule."""
    tokenizer_config = None if tokenizer is None else TOKENIZERS.parse(tokenizer, "tokenizer")
    return LMDataModule(CORPORA.parse(data, "data"), tokenizer_config, seed, cache_dir)
