"""Causal k-nearest-key search for ALCCA, behind one small interface.

An index holds the keys of N independent heads (batch x key heads), added in time order:

    index = INDEXES[name](dim, options, inner_product=False)
    index.add(keys)                              # keys (N, S_new, D), the next positions
    ids = index.search(queries, positions, k)    # queries (N, M, D), positions (M,) -> (N, M, k)

Query m may see the keys at positions 0..positions[m] (the exact index also takes positions
(N, M), one list per head); `ids` lists its k nearest such keys
by Euclidean distance, nearest first, padded with -1 where fewer than k are visible; with
`inner_product=True`, its k keys of largest q.k instead (maximum inner-product search: the
neighbours of metric attention under `key_norm=ignore`, whose scores are 2 alpha q.k). The
search runs without autograd: it returns positions only, and ALCCA recomputes distances
from the chosen keys so gradients flow through them (`moa/attention/alcca.py`).

Backends:
- `exact`: blocked top-k in PyTorch: query blocks x key blocks with a running top-k, so
  memory is O(M * k) plus one block x block tile; time O(M * S * D). Any device; the one
  used for training.
- `faiss_flat`, `faiss_ivf`, `faiss_hnsw`: FAISS CPU indexes (the optional extra
  `pip install moa[faiss]`), one per head, for long-context inference. Causality: an index
  also holds keys that some queries must not see (those added after them in the same
  `add`); the search over-fetches k + (number of such keys) and drops them, which is exact
  for `faiss_flat` and keeps the approximate indexes' results independent of how keys were
  batched into `add` calls, except HNSW, whose graph depends on the insertion batches.
  `faiss_ivf` trains its coarse quantizer on the first `39 * nlist` keys (FAISS's minimum
  training set per list) and searches exactly before that, so no query's neighbours depend
  on keys after it. Keys are copied to CPU float32; FAISS GPU indexes are not used.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moa.schema import check

FAISS_MIN_TRAIN_PER_LIST = 39


@dataclass
class IndexOptions:
    block: int = 512  # exact: queries (and keys) per tile of the blocked top-k
    chunk: int = 128  # faiss: positions per `add` in a full forward (exact adds `block`)
    nlist: int = 32  # faiss_ivf: inverted lists
    nprobe: int = 8  # faiss_ivf: lists searched per query
    hnsw_m: int = 16  # faiss_hnsw: graph degree
    ef_search: int = 64  # faiss_hnsw: search beam (raised to the number of ids fetched)

    def __post_init__(self) -> None:
        for name in ("block", "chunk", "nlist", "nprobe", "hnsw_m", "ef_search"):
            value = getattr(self, name)
            check(value > 0, f"index_options.{name}", value, "a positive integer")
        check(self.nprobe <= self.nlist, "index_options.nprobe", self.nprobe,
              f"<= index_options.nlist={self.nlist}")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def first_visible(ids: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Keep, in order, the first k ids (N, M, F) that query m may see (0 <= id <= position)."""
    visible = (ids >= 0) & (ids <= positions[:, None])
    order = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices[..., :k]
    kept = ids.gather(-1, order)
    kept = kept.masked_fill(~visible.gather(-1, order), -1)
    if kept.size(-1) < k:
        kept = torch.nn.functional.pad(kept, (0, k - kept.size(-1)), value=-1)
    return kept


class ExactIndex:
    """Blocked exact top-k by squared L2 (or inner product), in PyTorch on the keys' device."""

    def __init__(self, dim: int, options: IndexOptions, inner_product: bool = False) -> None:
        self.block = self.chunk = options.block
        self.inner_product = inner_product
        self.keys: torch.Tensor | None = None  # (N, S, D)

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.size(1)

    def add(self, keys: torch.Tensor) -> None:
        keys = keys.detach()
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=1)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
        N, M, _ = queries.shape
        ids = torch.full((N, M, k), -1, dtype=torch.long, device=queries.device)
        # score = ||k||^2 - 2 q.k, the squared distance less ||q||^2 (the same for all of a
        # query's keys), as one product: [-2 q, 1] . [k, ||k||^2]; -2 q.k by inner product
        keys = self.keys.to(queries.dtype)
        norms = (keys.new_zeros(*keys.shape[:2], 1) if self.inner_product
                 else keys.pow(2).sum(-1, keepdim=True))  # (N, S, 1)
        keys = torch.cat([keys, norms], dim=-1)  # (N, S, D+1)
        queries = torch.cat([-2 * queries, queries.new_ones(N, M, 1)], dim=-1)  # (N, M, D+1)
        for start in range(0, M, self.block):
            q = queries[:, start:start + self.block]  # (N, m, D+1)
            seen = positions[..., start:start + self.block]  # (m,) or (N, m)
            visible = int(seen.max()) + 1
            best_d, best_i = self._tile_top_k(q, keys, seen, 0, visible, k)
            for k_start in range(self.block, visible, self.block):
                tile_d, tile_i = self._tile_top_k(q, keys, seen, k_start, visible, k)
                best_d, order = torch.cat([best_d, tile_d], dim=-1).topk(
                    min(k, best_d.size(-1) + tile_d.size(-1)), dim=-1, largest=False)
                best_i = torch.cat([best_i, tile_i], dim=-1).gather(-1, order)
            found = best_i.masked_fill(best_d.isinf(), -1)
            ids[:, start:start + self.block, :found.size(-1)] = found
        return ids

    def _tile_top_k(self, q: torch.Tensor, keys: torch.Tensor, seen: torch.Tensor,
                    k_start: int, visible: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best-scored keys k_start.. (one tile) of `keys` (N, S, D+1) for the queries q
        (N, m, D+1) that may see keys up to `seen` (m,) or (N, m): -> scores and ids (N, m,
        min(k, tile)), inf where hidden."""
        k_end = min(k_start + self.block, visible)
        score = q @ keys[:, k_start:k_end].mT  # (N, m, s)
        if k_end - 1 > int(seen.min()):  # some query must not see some key of the tile
            cols = torch.arange(k_start, k_end, device=q.device)  # (s,)
            score.masked_fill_(cols > seen[..., None], float("inf"))
        score, top = score.topk(min(k, k_end - k_start), dim=-1, largest=False)
        return score, top + k_start


class _FaissIndex(ABC):
    """One FAISS index per head; subclasses say how one is made."""

    def __init__(self, dim: int, options: IndexOptions, inner_product: bool = False) -> None:
        import faiss  # optional dependency: the config checked that it is installed

        self.faiss, self.dim, self.options = faiss, dim, options
        self.metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
        self.chunk = options.chunk
        self.indexes: list[Any] = []
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @abstractmethod
    def _new(self) -> Any:
        """A new, empty FAISS index for one head."""

    def add(self, keys: torch.Tensor) -> None:
        keys = _numpy(keys)  # (N, s, D)
        if not self.indexes:
            self.indexes = [self._new() for _ in range(keys.shape[0])]
        for index, head_keys in zip(self.indexes, keys, strict=True):
            index.add(head_keys)
        self.size += keys.shape[1]

    def _prepare(self, fetch: int) -> None:  # noqa: B027 (a hook; only HNSW needs it)
        """Set search-time parameters for fetching `fetch` ids (none by default)."""

    @torch.no_grad()
    def search(self, queries: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
        hidden = self.size - 1 - int(positions.min())  # keys some query must not see
        fetch = min(k + hidden, self.size)
        self._prepare(fetch)
        found = [index.search(head, fetch)[1] for index, head in
                 zip(self.indexes, _numpy(queries), strict=True)]
        ids = torch.from_numpy(np.stack(found)).to(queries.device)  # (N, M, fetch)
        return first_visible(ids, positions, k)


    def _flat(self) -> Any:
        return self.faiss.IndexFlat(self.dim, self.metric)


class FaissFlatIndex(_FaissIndex):
    def _new(self) -> Any:
        return self._flat()


class FaissHNSWIndex(_FaissIndex):
    def _new(self) -> Any:
        return self.faiss.IndexHNSWFlat(self.dim, self.options.hnsw_m, self.metric)

    def _prepare(self, fetch: int) -> None:
        for index in self.indexes:
            index.hnsw.efSearch = max(self.options.ef_search, fetch)


class FaissIVFIndex(_FaissIndex):
    """IVF-flat whose quantizer is trained on the first `39 * nlist` keys; queries that
    cannot see all of those are searched exactly among them."""

    def __init__(self, dim: int, options: IndexOptions, inner_product: bool = False) -> None:
        super().__init__(dim, options, inner_product)
        self.train_size = FAISS_MIN_TRAIN_PER_LIST * options.nlist
        self.warmup = ExactIndex(dim, options, inner_product)  # the first train_size keys
        self.pending: list[np.ndarray] = []  # keys added before training, (N, s, D) each

    def _new(self) -> Any:
        index = self.faiss.IndexIVFFlat(self._flat(), self.dim, self.options.nlist,
                                        self.metric)
        index.nprobe = self.options.nprobe
        return index

    def add(self, keys: torch.Tensor) -> None:
        if len(self.warmup) < self.train_size:
            self.warmup.add(keys[:, :self.train_size - len(self.warmup)])
        if self.indexes:
            super().add(keys)
            return
        self.pending.append(_numpy(keys))
        self.size += keys.size(1)
        if self.size >= self.train_size:
            stored = np.concatenate(self.pending, axis=1)  # (N, S, D)
            self.indexes = [self._new() for _ in range(stored.shape[0])]
            for index, head_keys in zip(self.indexes, stored, strict=True):
                index.train(head_keys[:self.train_size])
                index.add(head_keys)
            self.pending = []

    @torch.no_grad()
    def search(self, queries: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
        early = positions < self.train_size - 1  # cannot see the whole training set
        if bool(early.all()):
            return self.warmup.search(queries, positions, k)
        if not bool(early.any()):
            return super().search(queries, positions, k)
        ids = torch.empty(*queries.shape[:2], k, dtype=torch.long, device=queries.device)
        ids[:, early] = self.warmup.search(queries[:, early], positions[early], k)
        ids[:, ~early] = super().search(queries[:, ~early], positions[~early], k)
        return ids


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


INDEXES: dict[str, type] = {
    "exact": ExactIndex,
    "faiss_flat": FaissFlatIndex,
    "faiss_ivf": FaissIVFIndex,
    "faiss_hnsw": FaissHNSWIndex,
}
