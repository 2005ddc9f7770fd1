"""The decoder: KV-cache equivalence, generation, positions, weight tying."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moa.errors import ConfigError
from moa.models.generation import SamplingConfig, decoding_step, generate, next_token
from moa.models.language_model import build_model
from moa.params import model_config
from tests.conftest import assert_next_token_depends_on_context, tiny_model_config


@st.composite
def head_layouts(draw) -> dict:
    """n_q_heads = n_kv_heads * group <= 8 of the model's 8 heads (fewer: SQA), of any
    width (heads together may be wider or narrower than d_model 32)."""
    n_kv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 8 // n_kv))
    return {"n_q_heads": n_kv * group, "n_kv_heads": n_kv,
            "head_dim": draw(st.sampled_from([None, 4, 6, 12]))}


@settings(max_examples=25)
@given(layout=head_layouts(), position=st.sampled_from(["rope", "learned"]),
       cuts=st.lists(st.integers(1, 20), min_size=1, max_size=4, unique=True))
@example(layout={"n_q_heads": 8, "n_kv_heads": 8, "head_dim": None}, position="rope",
         cuts=[8, 9])
@example(layout={"n_q_heads": 8, "n_kv_heads": 1, "head_dim": 12}, position="learned",
         cuts=[8, 9])
def test_cached_forward_equals_full_forward(layout, position, cuts):
    """Chunks cut at `cuts` through the cache (a prefill, single steps, several tokens at a
    time) give the full forward's logits."""
    torch.manual_seed(0)
    head_dim = layout.pop("head_dim")
    config = tiny_model_config(layout, position=position, head_dim=head_dim, n_heads=8)
    model = build_model(config).eval()
    ids = torch.randint(0, 50, (2, 21))
    full = model(ids).logits
    cache = model.new_cache()
    bounds = [0, *sorted(cuts), 21]
    chunks = [model(ids[:, a:b], cache).logits for a, b in zip(bounds, bounds[1:], strict=False)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 21


def test_a_cache_holds_exactly_its_capacity():
    """A cache of 12 positions takes 12, to the last one; a 13th is refused with a message
    that says so (the model itself would take 16)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(max_seq_len=16)).eval()
    ids = torch.randint(0, 50, (1, 13))
    cache = model.new_cache(capacity=12)
    with torch.no_grad():
        steps = [model(ids[:, :11], cache).logits, model(ids[:, 11:12], cache).logits]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(ids[:, :12]).logits,
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="KV cache is full: 13 positions > capacity 12"):
            model(ids[:, 12:], cache)


@pytest.mark.parametrize("attention", [{}, {"n_kv_heads": 2}])
def test_cached_generation_equals_uncached(attention):
    """On a model whose next token depends on its context (asserted: at init_std 0.3, not
    0.02), so a cache that lost the context would generate other tokens."""
    torch.manual_seed(1)
    model = build_model(tiny_model_config(attention, init_std=0.3)).eval()
    assert_next_token_depends_on_context(lambda x: model(x).logits, torch.randint(0, 50, (16, 5)))
    prompt = torch.randint(0, 50, (3, 5))
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    cached = generate(model, prompt, greedy)
    uncached = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=0.0,
                                                      use_cache=False))
    assert cached.shape == (3, 25)
    assert torch.equal(cached, uncached)
    sampled = SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=10, top_p=0.9)
    a = generate(model, prompt, sampled, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, SamplingConfig(**{**sampled.__dict__, "use_cache": False}),
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = next_token(logits, SamplingConfig(temperature=1.0, top_k=2), gen)
    assert set(top2.flatten().tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # p0 = 0.64, p0 + p1 = 0.88
    nucleus = next_token(logits, SamplingConfig(temperature=1.0, top_p=0.8), gen)
    assert set(nucleus.flatten().tolist()) == {0, 1}
    assert probs[0] < 0.8 < probs[:2].sum()
    greedy = next_token(logits, SamplingConfig(temperature=0.0))
    assert torch.equal(greedy, torch.zeros(200, 1).long())


def test_rope_rotation_is_relative():
    """q.k after rotation depends only on the distance between positions."""
    from moa.layers.position import RotaryConfig, RotaryPosition

    rope = RotaryPosition(RotaryConfig(), max_seq_len=64, d_model=32, head_dim=8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        qi, _ = rope.rotate(q, q, torch.tensor([i]))
        _, kj = rope.rotate(k, k, torch.tensor([j]))
        return (qi * kj).sum()

    torch.testing.assert_close(score(10, 7), score(40, 37))
    torch.testing.assert_close(rope.rotate(q, k, torch.tensor([5]))[0].norm(), q.norm())


def test_tied_embeddings_share_the_weight_and_count_once():
    tied = build_model(tiny_model_config())
    untied = build_model(tiny_model_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == 50 * 32


def test_sequence_longer_than_context_is_refused():
    model = build_model(tiny_model_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_optimizer_decays_only_matrices():
    from moa.training.optim import parameter_groups

    model = build_model(tiny_model_config())
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.embedding.weight) not in decayed  # tied to the head: an embedding
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(id(p) not in decayed for n, p in model.named_parameters() if "norm" in n)
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len({id(p) for p in model.parameters()})


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from moa.config import OptimConfig
    from moa.training.optim import lr_factor

    config = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(step, config, total_steps=110) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[110] == pytest.approx(0.1)


def test_generation_stops_when_every_sequence_emits_the_stop_token():
    torch.manual_seed(3)
    model = build_model(tiny_model_config())
    prompt = torch.randint(0, 50, (1, 4))
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    first = int(generate(model, prompt, greedy)[0, 4])
    stopped = generate(model, prompt, greedy, stop_token=first)
    assert stopped.shape == (1, 5) and int(stopped[0, -1]) == first


TINY = ["model.d_model=32", "model.n_heads=4", "model.n_layers=2", "model.vocab_size=300",
        "model.max_seq_len=32", "tokenizer=byte"]


def test_the_moa_presets_cached_step_traces_as_one_graph_equal_to_eager():
    """moa_metric's one-token step (top-k mixtures, HyperFFN, MoA head) under the compiler:
    one graph, no break (the routed sums run dense), and compiled steps with the cache
    growing symbolically give the eager steps' logits."""
    torch._dynamo.reset()
    torch.manual_seed(8)
    model = build_model(model_config(["model=moa_metric", *TINY])).eval()
    ids = torch.randint(0, 300, (2, 16))
    eager_cache, compiled_cache, explained_cache = (model.new_cache() for _ in range(3))
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for cache in (eager_cache, compiled_cache, explained_cache):
            model(ids[:, :9], cache)
        explanation = torch._dynamo.explain(model)(ids[:, 9:10], explained_cache)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), \
            explanation.break_reasons
        for t in range(9, 16):
            torch.testing.assert_close(compiled(ids[:, t:t + 1], compiled_cache).logits,
                                       model(ids[:, t:t + 1], eager_cache).logits)


def test_compile_without_the_cache_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="compile"):
        SamplingConfig(compile=True, use_cache=False)


def test_a_model_with_ball_pruning_decodes_eagerly_with_a_warning():
    model = build_model(model_config(["model=discoverlm", *TINY])).eval()
    with pytest.warns(UserWarning, match="ball pruning decodes eagerly"):
        assert decoding_step(model) is model


@pytest.mark.slow
def test_compiled_decoding_generates_the_eager_tokens():
    """`sampling.compile` (inductor) on moa_metric: the same greedy and sampled tokens."""
    torch.manual_seed(9)
    model = build_model(model_config(["model=moa_metric", *TINY, "model.init_std=0.3"])).eval()
    prompt = torch.randint(0, 300, (2, 6))
    for sampling in (SamplingConfig(max_new_tokens=12, temperature=0.0),
                     SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=20)):
        eager = generate(model, prompt, sampling, generator=torch.Generator().manual_seed(1))
        compiled = generate(model, prompt, SamplingConfig(**{**sampling.__dict__,
                                                             "compile": True}),
                            generator=torch.Generator().manual_seed(1))
        assert torch.equal(compiled, eager)
