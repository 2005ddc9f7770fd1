"""Output positions: a forward that wants a few positions' logits (mqar's queries) gives
exactly the full forward's there, with the same gradients, statistics and auxiliary
losses, for every attention scheme in conf/attention/ and every model preset; and the last
block then computes those positions only, where nothing after it mixes positions."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from moa.models.language_model import build_model
from moa.params import CONF_DIR, model_config
from moa.training.callbacks import batch_flops, training_flops
from tests.conftest import tiny_model_config

TINY = ["model.d_model=32", "model.n_heads=4", "model.n_layers=2", "model.vocab_size=300",
        "model.max_seq_len=64", "tokenizer=byte"]
ATTENTIONS = sorted(path.stem for path in (CONF_DIR / "attention").glob("*.yaml"))
MODELS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")  # the decoders
                if OmegaConf.load(path).model.get("architecture") != "reactive")


def _wanted(batch: int, length: int, count: int) -> torch.Tensor:
    """(B, K) distinct positions per row, in order, as mqar's scored_positions are."""
    return torch.rand(batch, length).argsort(dim=1)[:, :count].sort(dim=1).values


def _selected_and_full(model, ids, positions, dtype=torch.float64):
    """(logits, grads, stats, aux losses) of the forward with output_positions, and of the
    full forward with its logits taken at those positions; the same seed before each, for
    anything sampled (the triangle-inequality penalty's triples)."""
    model = model.to(dtype)
    weights = torch.randn(*positions.shape, model.config.vocab_size, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(selected: bool):
        torch.manual_seed(1)
        output = model(ids, output_positions=positions) if selected else model(ids)
        logits = output.logits
        if not selected:
            logits = logits.gather(1, positions[..., None].expand(-1, -1, logits.size(-1)))
        loss = (logits * weights).sum()
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(params, grads, strict=True)]
        return logits, grads, output.stats, {k: v for k, (v, _) in output.aux_losses.items()}

    return run(True), run(False)


def _assert_same(got, want, **tolerance):
    (logits, grads, stats, aux), (w_logits, w_grads, w_stats, w_aux) = got, want
    torch.testing.assert_close(logits, w_logits, **tolerance)
    for g, w in zip(grads, w_grads, strict=True):
        torch.testing.assert_close(g, w, **tolerance)
    assert stats.keys() == w_stats.keys() and aux.keys() == w_aux.keys()
    for key in w_stats:
        torch.testing.assert_close(stats[key], w_stats[key], **tolerance)
    for key in w_aux:
        torch.testing.assert_close(aux[key], w_aux[key], **tolerance)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_scheme_gives_the_full_forward_at_the_wanted_positions(attention):
    config = model_config(["model=gpt", f"attention={attention}", *TINY])
    torch.manual_seed(0)
    model = build_model(config).train()
    assert model.last_block_at_outputs
    ids = torch.randint(0, config.vocab_size, (3, 40))
    _assert_same(*_selected_and_full(model, ids, _wanted(3, 40, 5)))


@pytest.mark.parametrize("preset", MODELS)
def test_every_model_preset_gives_the_full_forward_at_the_wanted_positions(preset):
    """Presets whose FFN or head mixes positions (HyperFFN's causal conv, the MoA head)
    run the last block in full and select at the head; the others select in the block."""
    config = model_config([f"model={preset}", *TINY])
    torch.manual_seed(0)
    model = build_model(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 33))
    _assert_same(*_selected_and_full(model, ids, _wanted(2, 33, 4)))


@pytest.mark.parametrize("attention", [
    {"name": "metric", "use_balls": True, "radius_init": 0.5, "n_kv_heads": 2},
    {"name": "metric", "ti_reg_weight": 0.5, "metric": {"name": "maha_diag"}},
    {"name": "metric", "metric": {"name": "cosine"}, "n_kv_heads": 1, "impl": "eager"},
])
def test_metric_attention_at_the_wanted_positions_keeps_balls_and_penalty(attention):
    """The wanted queries' own keys, ball pruning (with its pruned fraction and gate
    gradients) and the triangle-inequality penalty are the full forward's."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(attention)).train()
    ids = torch.randint(0, 50, (3, 31))
    (got, want) = _selected_and_full(model, ids, _wanted(3, 31, 5))
    _assert_same(got, want)
    if attention.get("use_balls"):
        pruned = float(want[2]["layers.1.attention.pruned_fraction"])
        assert 0.0 < pruned < 1.0  # the balls prune some keys, not all
    if attention.get("ti_reg_weight"):
        assert "layers.1.attention.ti_penalty" in want[3]


@pytest.mark.parametrize("attention", [
    {"name": "alcca", "k": 5, "theta": 0.3, "n_kv_heads": 2, "index_options": {"block": 8}},
    {"name": "alcca", "k": 3, "weighting": "inverse_distance", "n_kv_heads": 1},
    {"name": "alcca", "k": 4, "index": "faiss_flat"},
])
def test_alcca_at_the_wanted_positions_searches_as_the_full_forward(attention):
    """The wanted queries find the same neighbours (exact index: per-head positions, query
    blocks; FAISS: a full forward, then the wanted rows) and the same centre branch."""
    if attention.get("index") == "faiss_flat":
        pytest.importorskip("faiss")
    torch.manual_seed(0)
    model = build_model(tiny_model_config(attention)).train()
    assert model.blocks[-1].attention.computes_output_positions == ("index" not in attention)
    ids = torch.randint(0, 50, (3, 37))
    got, want = _selected_and_full(model, ids, _wanted(3, 37, 9))
    _assert_same(got, want)
    if attention.get("theta"):
        assert 0.0 < float(want[2]["layers.1.attention.centre_fraction"]) < 1.0


def test_a_top_k_mixture_runs_every_path_some_token_chose():
    """Top-1 routing, one wanted position at a time: a path that only unwanted tokens chose
    still runs, so its statistics (the metric path's pruned fraction) are recorded."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config({"name": "mixture", "router": {
        "name": "topk", "router_topk": 1, "router_hidden": None}, "paths": [
            {"name": "dot_product"}, {"name": "metric", "use_balls": True, "radius_init": 0.5},
            {"name": "channel_mix"}]})).train()
    ids = torch.randint(0, 50, (1, 24))
    for position in range(0, 24, 3):
        _assert_same(*_selected_and_full(model, ids, torch.tensor([[position]])))


@pytest.mark.parametrize("position", ["rope", "blackhole_rope", "learned"])
@pytest.mark.parametrize("attention", [{}, {"n_kv_heads": 1}, {"n_q_heads": 2, "n_kv_heads": 2}])
def test_queries_at_the_wanted_positions_are_rotated_there(position, attention):
    """Each encoding places the selected queries at their own positions, per batch row."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(attention, position=position))
    ids = torch.randint(0, 50, (3, 29))
    _assert_same(*_selected_and_full(model, ids, _wanted(3, 29, 6)))


@pytest.mark.parametrize("attention", [{"name": "dot_product"},
                                       {"name": "mixture", "paths": [
                                           {"name": "dot_product"},
                                           {"name": "dot_product", "n_kv_heads": 1},
                                           {"name": "channel_mix"}]}])
def test_the_last_block_queries_only_the_wanted_positions(attention):
    """The point of it: the last block's query projections (and channel mix) see the K
    wanted rows of each sequence, the first block's all T."""
    model = build_model(tiny_model_config(attention))
    rows = {0: [], 1: []}  # block -> the rows each projection saw
    for index, block in enumerate(model.blocks):
        for name, module in block.attention.named_modules():
            if name.split(".")[-1] in ("q", "up"):  # queries apart, channel mix
                module.register_forward_hook(lambda module, args, out, index=index:
                                             rows[index].append(args[0].shape[:-1].numel()))
            if name.split(".")[-1] == "heads":  # queries stacked with the keys and values
                module.stacked = lambda x, *a, stacked=module.stacked, index=index: (
                    rows[index].append(x.shape[:-1].numel()) or stacked(x, *a))
    model(torch.randint(0, 50, (2, 30)), output_positions=_wanted(2, 30, 3))
    assert rows[0] and set(rows[0]) == {2 * 30}
    assert len(rows[1]) == len(rows[0]) and set(rows[1]) == {2 * 3}


def test_a_cached_continuation_at_wanted_positions_equals_the_full_forward():
    """After a cached prefix, the new tokens' wanted positions index into the new tokens,
    and their queries see the cached keys too."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config({"n_kv_heads": 2})).double().eval()
    ids = torch.randint(0, 50, (2, 30))
    positions = _wanted(2, 18, 4)  # among the last 18 tokens
    with torch.no_grad():
        full = model(ids).logits[:, 12:].gather(1, positions[..., None].expand(-1, -1, 50))
        cache = model.new_cache()
        model(ids[:, :12], cache)
        continued = model(ids[:, 12:], cache, output_positions=positions).logits
    torch.testing.assert_close(continued, full)
    assert cache.length == 30


def test_the_flop_count_is_of_the_forward_that_wants_a_few_positions():
    """Training counts FLOPs for its batches' scored positions: wanting every position
    costs what the full forward does, wanting one per sequence saves at least the
    vocabulary projection (forward and backward) of the others."""
    config = tiny_model_config({"n_kv_heads": 2})
    B, T = 4, 32
    full = training_flops(config, (B, T))
    assert training_flops(config, (B, T), T) == full
    head = 2 * config.d_model * config.vocab_size  # one position's projection, forward
    assert training_flops(config, (B, T), 1) <= full - 3 * head * B * (T - 1)


@pytest.mark.parametrize("attention", [{"n_kv_heads": 2}, {"n_kv_heads": 4}])
def test_a_batch_counts_the_flops_the_meta_device_counts(attention):
    """`batch_flops` counts a real forward + backward (CPU flash attention included, GQA
    too) exactly as `training_flops` counts the meta-device copy; with top-k routing, only
    the batch can be counted, and a routed path's rows cost less than every row."""
    config = tiny_model_config(attention)
    B, T = 2, 24
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (B, T))
    assert batch_flops(lambda: model(ids).logits.sum().backward()) == training_flops(config, (B, T))
    paths = [{"name": "dot_product"}, {"name": "channel_mix"}, {"name": "channel_mix"}]
    routed, dense = (tiny_model_config({"name": "mixture", "paths": [dict(p) for p in paths],
                                        "router": router})
                     for router in ({"name": "topk", "router_topk": 1}, {"name": "softmax"}))
    assert training_flops(routed, (B, T)) is None
    counts = []
    for config in (routed, dense):
        torch.manual_seed(0)
        model = build_model(config)
        counts.append(batch_flops(lambda m=model: m(ids).logits.sum().backward()))
    assert 0 < counts[0] < counts[1]
