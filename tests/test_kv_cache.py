"""The KV cache: compact rows (`CompactCache`), and metric attention's ball-aware cache,
which keeps only the keys inside their balls: cached decoding and chunked prefill equal
the uncached forward with pruning, and the bytes held follow the kept fraction."""

from __future__ import annotations

import pytest
import torch

from moa.layers.kv_cache import CompactCache, KVCache, LayerCache
from moa.models.generation import SamplingConfig, generate
from moa.models.language_model import build_model
from moa.models.params import kv_cache_bytes_per_token
from moa.params import model_config
from tests.conftest import ball_keys, pruned_fractions, radii_keeping, tiny_model_config


def test_compact_cache_rows_hold_the_kept_entries_in_order():
    """Random masks over calls of random lengths: each (batch, head) row holds exactly its
    kept entries, in order, and the staged view is the held rows (padded) then the new."""
    torch.manual_seed(0)
    store = CompactCache(capacity=40)
    kept_so_far = [[[] for _ in range(3)] for _ in range(2)]  # [b][h] -> entries (D,)
    for T in (5, 1, 1, 7, 1, 3):
        x = torch.randn(2, 3, T, 4)
        keep = torch.rand(2, 3, T) < 0.4
        length = store.length
        staged = store.stage({"x": x})["x"]  # (B, H, length + T, D)
        torch.testing.assert_close(staged[:, :, length:], x)
        valid = store.valid()
        for b in range(2):
            for h in range(3):
                held = kept_so_far[b][h]
                assert int(valid[b, h].sum()) == len(held)
                if held:
                    torch.testing.assert_close(staged[b, h, :len(held)], torch.stack(held))
        store.commit(keep)
        for b in range(2):
            for h in range(3):
                kept_so_far[b][h] += [x[b, h, t] for t in range(T) if keep[b, h, t]]
    longest = max(len(row) for rows in kept_so_far for row in rows)
    assert store.length == longest
    assert store.held_bytes() == 2 * 3 * longest * 4 * 4  # float32, padding included


def test_compact_cache_keeps_the_order_of_a_long_prefill():
    """A prefill of 300 entries, about half kept: each row holds its kept ones in their
    order (a sort that is not stable reorders rows this long)."""
    torch.manual_seed(1)
    store = CompactCache(capacity=300)
    x = torch.arange(2 * 3 * 300, dtype=torch.float64).view(2, 3, 300, 1)
    keep = torch.rand(2, 3, 300) < 0.5
    store.stage({"x": x})
    store.commit(keep)
    held = store.buffers["x"]  # (B, H, slots, 1)
    for b in range(2):
        for h in range(3):
            row = x[b, h, keep[b, h]]
            torch.testing.assert_close(held[b, h, :len(row)], row)


def test_compact_cache_fills_to_capacity_and_refuses_more():
    store = CompactCache(capacity=4)
    x = torch.randn(1, 2, 4, 3)
    torch.testing.assert_close(store.stage({"x": x})["x"], x)
    store.commit(torch.ones(1, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError) as error:
        store.stage({"x": torch.randn(1, 2, 1, 3)})
    assert str(error.value) == "KV cache is full: 5 positions > capacity 4"


def test_compact_cache_buffers_grow_by_doubling_up_to_capacity():
    """One kept entry a call, then six: 1, 2, 4, 4 (room left), then capped at 10 slots,
    so the copies of a growing row stay linear in its length."""
    store = CompactCache(capacity=10)
    sizes = []
    for T in (1, 1, 1, 1, 6):
        store.stage({"x": torch.randn(1, 1, T, 2)})
        sizes.append(store.buffers["x"].size(2))
        store.commit(torch.ones(1, 1, T, dtype=torch.bool))
    assert sizes == [1, 2, 4, 4, 10]


def test_layer_cache_fills_to_capacity_and_refuses_more():
    cache = LayerCache(capacity=4)
    x = torch.randn(1, 2, 3, 5)
    torch.testing.assert_close(cache.append("k", x), x)
    torch.testing.assert_close(cache.append("k", x[:, :, :1]), torch.cat([x, x[:, :, :1]], 2))
    with pytest.raises(ValueError) as error:
        cache.append("k", x[:, :, :1])
    assert str(error.value) == "KV cache is full: 5 positions > capacity 4"


def test_every_cache_of_a_model_cache_holds_its_capacity():
    """The layers', the shared FFN's and the LM head's caches, and the capacity the Hugging
    Face wrapper reads back."""
    cache = KVCache(n_layers=2, capacity=6)
    assert cache.capacity == 6 and cache.length == 0 and len(cache.layers) == 2
    for layer in (*cache.layers, cache.ffn, cache.head):
        assert layer.append("k", torch.zeros(1, 1, 6, 2)).size(2) == 6


def test_each_compact_cache_name_is_its_own_cache():
    cache = LayerCache(capacity=8)
    first, second = cache.compact("a"), cache.compact("b")
    assert first is not second and cache.compact("a") is first


def _metric_model(n_kv_heads: int, impl: str, **attention) -> torch.nn.Module:
    torch.manual_seed(n_kv_heads)
    config = tiny_model_config({"name": "metric", "impl": impl, "n_kv_heads": n_kv_heads,
                                "metric": {"name": "maha_diag"}, "use_balls": True,
                                "alpha_init": 0.5, "key_norm": "free", **attention})
    return build_model(config).double().eval()


def _moa_model(impl: str) -> torch.nn.Module:
    """model=moa_metric tiny with balls on both metric paths (MHA and MQA), top-2 routing."""
    torch.manual_seed(7)
    config = model_config(["model=moa_metric", "model.size=tiny", "tokenizer=byte",
                           "attention.paths.1.use_balls=true", "attention.paths.3.use_balls=true",
                           f"+attention.paths.1.impl={impl}", f"+attention.paths.3.impl={impl}"])
    return build_model(config).double().eval()


@torch.no_grad()
def _decoded(model: torch.nn.Module, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """The logits (B, T, V) of `prefix` tokens in one cached call, then one token a call."""
    cache = model.new_cache()
    steps = [model(ids[:, :prefix], cache).logits]
    steps += [model(ids[:, t:t + 1], cache).logits for t in range(prefix, ids.size(1))]
    return torch.cat(steps, dim=1)


MODELS = {
    "mha": lambda impl: _metric_model(4, impl),
    "gqa": lambda impl: _metric_model(2, impl),
    "mqa": lambda impl: _metric_model(1, impl),
    "moa_block": _moa_model,
}


@pytest.mark.parametrize("impl", ["eager", "cpu_fused"])
@pytest.mark.parametrize("layout", sorted(MODELS))
def test_cached_decoding_with_balls_equals_uncached(layout, impl):
    """Greedy decoding with the ball-aware cache picks the tokens of uncached decoding, and
    a prefix then one token at a time gives the full forward's logits (float64), with the
    balls pruning a measured share of keys strictly between 0 and 1 in every layer."""
    model = MODELS[layout](impl)
    ids = torch.randint(0, 50, (3, 21))
    radii_keeping(model, ids, 0.4)
    fractions = pruned_fractions(model, ids)
    assert fractions and all(0.3 < f < 0.9 for f in fractions)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(_decoded(model, ids, prefix=6), full, rtol=1e-9, atol=1e-9)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    cached = generate(model, ids[:, :9], greedy)
    uncached = generate(model, ids[:, :9], SamplingConfig(max_new_tokens=12, temperature=0.0,
                                                          use_cache=False))
    assert torch.equal(cached, uncached)


def test_one_sequence_decoding_with_balls_keeps_unchosen_paths_caches():
    """Batch 1: at each step top-2 routing leaves two of the MoA block's four paths
    unchosen, and such a path only extends its cache (no query, `output_positions` empty);
    the ball-aware cache must still take the step's key, or later steps that choose the
    path read a cache with a hole."""
    _assert_steps_match_the_full_forward(MODELS["moa_block"]("cpu_fused"),
                                         torch.randint(0, 50, (1, 24)), prefix=4)


@pytest.mark.slow  # the Triton interpreter on CPU: about 30 s
def test_cached_decoding_with_balls_through_triton_equals_uncached():
    """The Triton kernels read the compacted cache as the CPU ones do (GQA, float64)."""
    pytest.importorskip("triton")
    _assert_steps_match_the_full_forward(MODELS["gqa"]("triton"), torch.randint(0, 50, (3, 21)),
                                         prefix=6)


def _assert_steps_match_the_full_forward(model: torch.nn.Module, ids: torch.Tensor,
                                         prefix: int) -> None:
    """With balls keeping 0.4 of the keys, a cached prefix then one token a call gives the
    full forward's logits (float64)."""
    radii_keeping(model, ids, 0.4)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(_decoded(model, ids, prefix), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["gqa", "moa_block"])
def test_chunked_prefill_with_balls_equals_one_shot(layout):
    """Chunks of several tokens into a non-empty cache give the one-shot logits, and so
    does a last chunk that asks for a few positions' logits only (`output_positions`)."""
    model = MODELS[layout]("cpu_fused")
    ids = torch.randint(0, 50, (2, 23))
    radii_keeping(model, ids, 0.5)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        chunks = [model(ids[:, a:b], cache).logits for a, b in ((0, 7), (7, 8), (8, 13))]
        wanted = torch.tensor([[1, 6], [9, 0]])  # a few positions of the last chunk only
        selected = model(ids[:, 13:], cache, output_positions=wanted).logits  # (B, 2, V)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full[:, :13], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(selected, full[:, 13:].gather(
        1, wanted[..., None].expand(-1, -1, full.size(-1))), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kept", [0.25, 0.6])
def test_cache_bytes_follow_the_kept_fraction(kept):
    """The bytes the cache holds after a prefill are those of each layer's longest row of
    kept keys (counted from the balls, independently), and, per token, about the kept
    fraction of the cache without balls (`kv_cache_bytes_per_token`, measured)."""
    model = _metric_model(2, "cpu_fused").float()
    probe = torch.randint(0, 50, (1, 48), generator=torch.Generator().manual_seed(0))
    radii_keeping(model, probe, kept)
    longest = [int((ball.distance(keys) <= ball.radius[:, None]).sum(-1).max())
               for ball, keys in ball_keys(model, probe)]  # per layer, over (batch, head) rows
    cache = model.new_cache()
    with torch.no_grad():
        model(probe, cache)
    D, Hkv = model.config.head_dim, 2
    slot = Hkv * (2 * D + 1) * 4  # k, v and the key norm, float32
    assert cache.held_bytes() == sum(longest) * slot
    dense = build_model(tiny_model_config({"name": "metric", "n_kv_heads": 2, "key_norm": "free"}))
    dense_bytes = kv_cache_bytes_per_token(dense)
    assert dense_bytes == model.config.n_layers * slot
    ratio = kv_cache_bytes_per_token(model) / dense_bytes
    assert kept - 0.1 < ratio < kept + 0.25  # the longest row: the kept fraction and a little
