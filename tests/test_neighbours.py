"""Causal nearest-key search: exact blocked top-k against brute force, FAISS recall."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moa.errors import ConfigError
from moa.kernels.neighbours import INDEXES, IndexOptions

FAISS_BACKENDS = ["faiss_flat", "faiss_ivf", "faiss_hnsw"]


def _brute_force(queries, keys, positions, k, inner_product=False):
    """The k nearest visible keys per query (or those of largest q.k), by a dense matrix."""
    if inner_product:
        distance = -queries.double() @ keys.double().mT  # (N, M, S)
    else:
        distance = torch.cdist(queries.double(), keys.double())  # (N, M, S)
    hidden = torch.arange(keys.size(1))[None, :] > positions[:, None]
    distance = distance.masked_fill(hidden, float("inf"))
    top = distance.topk(min(k, keys.size(1)), dim=-1, largest=False)
    return top.indices.masked_fill(top.values.isinf(), -1)


def _search(name, queries, keys, positions, k, chunk=None, inner_product=False, **options):
    """Add the keys `chunk` positions at a time (all at once by default), after each add
    searching the queries at those positions, as ALCCA's forward does."""
    index = INDEXES[name](keys.size(-1), IndexOptions(**options), inner_product=inner_product)
    chunk = chunk or keys.size(1)
    found = []
    for begin in range(0, keys.size(1), chunk):
        index.add(keys[:, begin:begin + chunk])
        rows = (positions >= begin) & (positions < begin + chunk)
        found.append(index.search(queries[:, rows], positions[rows], k))
    return torch.cat(found, dim=1)


def _causal_inputs(N, S, D, seed, group=1):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, S, D, generator=generator)
    queries = torch.randn(N, S * group, D, generator=generator)
    return queries, keys, torch.arange(S).repeat_interleave(group)


@settings(max_examples=25)
@given(S=st.integers(1, 120), k=st.integers(1, 130), group=st.integers(1, 3),
       block=st.integers(4, 40), chunk=st.integers(1, 50), inner_product=st.booleans())
@example(S=1, k=1, group=2, block=16, chunk=1, inner_product=False)
@example(S=17, k=4, group=2, block=16, chunk=17, inner_product=True)
@example(S=113, k=200, group=2, block=16, chunk=113, inner_product=False)
@example(S=113, k=200, group=2, block=16, chunk=113, inner_product=True)
def test_exact_search_is_the_causal_top_k(S, k, group, block, chunk, inner_product):
    """Any length, k (beyond the keys seen too: -1 fills), GQA group, tile and chunk, by
    distance or by inner product."""
    queries, keys, positions = _causal_inputs(3, S, 8, seed=S * 1000 + k, group=group)
    got = _search("exact", queries, keys, positions, min(k, S), chunk=chunk, block=block,
                  inner_product=inner_product)
    want = _brute_force(queries, keys, positions, k, inner_product)
    torch.testing.assert_close(got, want)


def test_exact_search_does_not_depend_on_blocks_or_chunks():
    queries, keys, positions = _causal_inputs(2, 57, 8, seed=1)
    whole = _search("exact", queries, keys, positions, 5, block=512)
    assert torch.equal(_search("exact", queries, keys, positions, 5, chunk=7, block=5), whole)


def _recall(got, want):
    hits = sum(len(set(g.tolist()) & set(w.tolist()) - {-1})
               for g, w in zip(got.flatten(0, 1), want.flatten(0, 1), strict=True))
    return hits / int((want >= 0).sum())


@pytest.mark.parametrize("name", FAISS_BACKENDS)
@pytest.mark.parametrize("inner_product", [False, True])
def test_faiss_recall_against_exact_search(name, inner_product):
    pytest.importorskip("faiss")
    queries, keys, positions = _causal_inputs(2, 1500, 16, seed=2)
    exact = _search("exact", queries, keys, positions, 10, inner_product=inner_product)
    options = {"nlist": 8, "nprobe": 6}  # IVF recall on random data needs many probes
    got = _search(name, queries, keys, positions, 10, chunk=64, inner_product=inner_product,
                  **options)
    recall = _recall(got, exact)
    assert recall == 1.0 if name == "faiss_flat" else recall >= 0.95, recall
    assert bool(((got <= positions[:, None]) | (got == -1)).all())  # never a future key


@pytest.mark.parametrize("name", ["faiss_flat", "faiss_ivf"])
def test_faiss_results_do_not_depend_on_chunks(name):
    """Decoding adds one key at a time; a full forward adds chunks: same neighbours."""
    pytest.importorskip("faiss")
    queries, keys, positions = _causal_inputs(2, 300, 8, seed=3)
    options = {"nlist": 2, "nprobe": 1}  # trained on the first 78 keys
    whole = _search(name, queries, keys, positions, 6, **options)
    assert torch.equal(_search(name, queries, keys, positions, 6, chunk=1, **options), whole)
    assert torch.equal(_search(name, queries, keys, positions, 6, chunk=37, **options), whole)


def test_index_options_errors_name_the_key():
    with pytest.raises(ConfigError, match="index_options.nprobe"):
        IndexOptions(nlist=4, nprobe=8)
    with pytest.raises(ConfigError, match="index_options.chunk"):
        IndexOptions(chunk=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"chunk": 0}, "index_options.chunk=0; allowed: a positive integer"),
    ({"ef_search": -3}, "index_options.ef_search=-3; allowed: a positive integer"),
    ({"nlist": 4, "nprobe": 8}, "index_options.nprobe=8; allowed: <= index_options.nlist=4"),
])
def test_index_options_errors_give_the_key_the_value_and_what_is_allowed(options, message):
    with pytest.raises(ConfigError) as error:
        IndexOptions(**options)
    assert str(error.value) == f"invalid config {message}"


@pytest.mark.parametrize("name", ["faiss_flat", "faiss_hnsw"])
def test_faiss_search_of_fewer_keys_than_k_and_of_bfloat16_keys(name):
    """Fewer keys stored than k (a sequence's first steps), more queries than k: each
    query's k ids, -1 where no key is left, as exact search; bfloat16 keys and queries are
    searched as their float32 values (numpy has no bfloat16)."""
    pytest.importorskip("faiss")
    queries, keys, positions = _causal_inputs(2, 4, 8, seed=4, group=3)  # M = 12, S = 4
    exact = _search("exact", queries, keys, positions, 6)
    assert exact.shape == (2, 12, 6) and (exact == -1).any()
    assert torch.equal(_search(name, queries, keys, positions, 6), exact)
    low = queries.bfloat16(), keys.bfloat16()
    assert torch.equal(_search(name, *low, positions, 6),
                       _search("exact", *(x.float() for x in low), positions, 6))
