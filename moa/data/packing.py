"""Token packing: each split becomes one flat int32 array, read as fixed-length windows.

Documents are tokenized, each followed by `<|eos|>`, and concatenated, so a window may
span a document boundary and the model learns where documents end. Arrays are cached as
`.npy` files keyed by the corpus and tokenizer hashes, and memory-mapped when read.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

from moa.data.cache_file import written_atomically
from moa.data.tokenizer import Tokenizer

ENCODE_BATCH = 1024  # documents per encode_batch call


def packed_tokens(
    split: datasets.Dataset, tokenizer: Tokenizer, path: Path
) -> np.ndarray:
    """The split's tokens `doc_0 <|eos|> doc_1 <|eos|> ...` (N,) int32, cached at `path`."""
    if not path.is_file():
        pieces = [np.zeros(0, dtype=np.int32)]
        for batch in split.iter(batch_size=ENCODE_BATCH):
            for ids in tokenizer.encode_batch(batch["text"]):
                pieces.append(np.asarray([*ids, tokenizer.eos_id], dtype=np.int32))
        with written_atomically(path) as partial:
            np.save(partial, np.concatenate(pieces))
    return np.load(path, mmap_mode="r")


class BlockDataset(Dataset):
    """Consecutive windows of a packed split: item i covers tokens [i*T, (i+1)*T + 1).

    Inputs of successive items tile the split without overlap; each window carries one
    extra token so that `labels` are the inputs shifted by one. Every token but the first
    is a label exactly once.
    """

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.block_size
        window = torch.from_numpy(
            np.array(self.tokens[start : start + self.block_size + 1], dtype=np.int64)
        )  # (T + 1,)
        return {"input_ids": window[:-1], "labels": window[1:]}  # (T,), (T,)
