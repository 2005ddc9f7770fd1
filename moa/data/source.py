"""What every data source shares: the common config fields, the registry, the built splits.

A data source (`data.name`) is one registered builder that turns its config into one torch
dataset per split. Text corpora go through a tokenizer and packing; synthetic tasks
(`mqar`) produce token ids directly. The DataModule only sees `LMSplits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from moa.registry import Registry
from moa.schema import check, check_range

if TYPE_CHECKING:
    from moa.data.tokenizer import Tokenizer

SPLITS = ("train", "validation", "test")


@dataclass
class DataConfig:
    """Fields every data config has; each source subclasses it and sets its `name`."""

    name: str
    block_size: int = 256  # tokens per training example; the YAMLs use ${model.max_seq_len}
    batch_size: int = 32
    eval_batch_size: int | None = None  # None: same as batch_size
    num_workers: int = 0
    val_fraction: float = 0.05  # of the train documents, when a source has no validation split
    test_fraction: float = 0.05  # likewise for test
    seed: int = 1234  # data seed: carving of splits, synthetic examples

    def __post_init__(self) -> None:
        check_range("block_size", self.block_size, 0, low_open=True)
        check_range("batch_size", self.batch_size, 0, low_open=True)
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size
        check_range("eval_batch_size", self.eval_batch_size, 0, low_open=True)
        check_range("num_workers", self.num_workers, 0)
        check_range("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        check_range("test_fraction", self.test_fraction, 0, 1, low_open=True, high_open=True)
        total = self.val_fraction + self.test_fraction
        check(total < 1, "test_fraction", self.test_fraction,
              f"< {1 - self.val_fraction:g} (val_fraction + test_fraction < 1)")

    @property
    def uses_tokenizer(self) -> bool:
        """Whether this source is text read through the `tokenizer` config section."""
        return True


@dataclass
class LMSplits:
    """A built data source: one dataset per split yielding {"input_ids", "labels"}: (T,)."""

    datasets: dict[str, Dataset]  # keys: SPLITS
    tokenizer: Tokenizer | None
    vocab_size: int
    fingerprint: dict[str, Any]  # plain values the run records (hashes, sizes)


# builder(config, tokenizer_config | None, cache_dir: Path) -> LMSplits
CORPORA: Registry[LMSplits] = Registry("data")
