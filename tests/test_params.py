"""`python -m moa.params`: the per-component table sums to the model's parameters, counted
once each, for every preset in conf/model/."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from moa.models.language_model import build_model
from moa.models.params import parameter_table
from moa.params import main, model_config
from tests.conftest import CONF_DIR, ROOT

PRESETS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


def unique_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def top_level(rows: list[tuple[str, int]]) -> dict[str, int]:
    return {name: count for name, count in rows if not name.startswith(" ")}


@pytest.mark.parametrize("preset", PRESETS)
def test_table_sums_to_the_model_total(preset, capsys):
    overrides = [f"model={preset}", "model.size=tiny"]
    with torch.device("meta"):
        model = build_model(model_config(overrides))
    rows = parameter_table(model)
    components = top_level(rows)
    assert sum(components.values()) == unique_parameters(model) == model.num_parameters()
    if hasattr(model, "parameter_groups"):  # the Reactive Transformer: its own rows
        assert list(components) == ["Encoder", "MLM head", "Decoder", "Memory attention"]
    else:
        assert {"embedding", "blocks", "norm", "lm_head"} <= set(components)
        parts = [count for name, count in rows if name.startswith("  ")]
        assert sum(parts) == components["blocks"]
    main(overrides)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"Total  {model.num_parameters() / 1e6:.2f}M"


def test_rxt_alpha_micro_card_matches_the_card():
    """The card: encoder ~1.88M (shared embedding and memory cross-attention counted), MLM
    head ~660k at d 128 / V 5,000; within 2%. The command prints the five rows."""
    result = subprocess.run([sys.executable, "-m", "moa.params", "model=rxt_alpha_micro",
                             "model.size=card"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    rows = {match[0]: int(match[1].replace(",", "")) for match in
            re.findall(r"^(Encoder|MLM head|Decoder|Memory attention) +([\d,]+) ",
                       result.stdout, re.MULTILINE)}
    assert set(rows) == {"Encoder", "MLM head", "Decoder", "Memory attention"}
    assert abs(rows["Encoder"] / 1.88e6 - 1) < 0.02
    assert abs(rows["MLM head"] / 660e3 - 1) < 0.02
    total = float(result.stdout.strip().splitlines()[-1].removeprefix("Total  ").rstrip("M"))
    assert total == round(sum(rows.values()) / 1e6, 2)


def test_tied_head_counts_zero_and_untied_counts_its_matrix():
    tied = top_level(parameter_table(build_model(model_config(["model=gpt", "model.size=tiny"]))))
    assert tied["lm_head"] == 0
    untied_model = build_model(model_config(["model=gpt", "model.size=tiny",
                                             "model.tie_embeddings=false"]))
    untied = top_level(parameter_table(untied_model))
    assert untied["lm_head"] == untied["embedding"] == 8192 * 64
    assert sum(untied.values()) == sum(tied.values()) + 8192 * 64


def test_vocabulary_comes_from_the_model_or_the_tokenizer():
    assert model_config(["tokenizer=byte"]).vocab_size == 265
    assert model_config(["tokenizer=bpe", "tokenizer.vocab_size=1000"]).vocab_size == 1000
    assert model_config(["tokenizer=byte", "model.vocab_size=300"]).vocab_size == 300


def test_command_line_ends_with_the_total():
    result = subprocess.run([sys.executable, "-m", "moa.params", "model=gpt", "model.size=card"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"Total  \d+\.\d\dM", last)
    with torch.device("meta"):
        model = build_model(model_config(["model=gpt", "model.size=card"]))
    assert last == f"Total  {model.num_parameters() / 1e6:.2f}M"


def test_bad_override_is_an_error_naming_the_key():
    with pytest.raises(SystemExit, match=r"^error: invalid config model.n_heads=5 "):
        main(["model.n_heads=5"])


def test_kv_cache_bytes_per_token_count_keys_and_values_per_kv_head():
    from moa.models.params import kv_cache_bytes_per_token

    mha = build_model(model_config(["model=gpt", "model.size=tiny", "tokenizer=byte"]))
    mqa = build_model(model_config(["model=gpt", "model.size=tiny", "tokenizer=byte",
                                    "attention=mqa"]))
    config = mha.config
    assert kv_cache_bytes_per_token(mha) == config.n_layers * 2 * config.d_model * 4  # float32
    assert kv_cache_bytes_per_token(mqa) * config.n_heads == kv_cache_bytes_per_token(mha)
    conv = build_model(model_config(["model=gpt", "model.size=tiny", "tokenizer=byte",
                                     "attention=local_conv"]))
    assert kv_cache_bytes_per_token(conv) == 0  # a fixed window, nothing grows per token


def test_command_prints_the_measured_kv_cache(capsys):
    """The line before the total is the cache measured on the model (`measure_kv_cache`)."""
    from moa.models.params import kv_cache_bytes_per_token

    overrides = ["model=gpt", "model.size=tiny", "tokenizer=byte", "attention=gqa"]
    main(overrides)
    line = capsys.readouterr().out.strip().splitlines()[-2]
    measured = kv_cache_bytes_per_token(build_model(model_config(overrides)))
    assert line.startswith(f"KV cache  {measured:,.0f} bytes/token (measured: batch 1, ")


def test_active_parameters_leave_out_the_paths_top_k_skips():
    from moa.models.params import active_parameters

    dense = build_model(model_config(["model=moas", "model.size=tiny", "tokenizer=byte"]))
    assert active_parameters(dense) == dense.num_parameters()  # softmax runs every path
    top2 = build_model(model_config(["model=moas", "model.size=tiny", "tokenizer=byte",
                                     "router=topk", "router.router_topk=2"]))
    paths = [sum(p.numel() for p in path.parameters())
             for path in top2.blocks[0].attention.paths]
    skipped = top2.config.n_layers * min(paths)  # the smallest of the three paths
    assert active_parameters(top2) == top2.num_parameters() - skipped


def test_ffn_none_leaves_attention_only_blocks():
    model = build_model(model_config(["model.size=tiny", "tokenizer=byte", "ffn=none"]))
    rows = dict(parameter_table(model))
    assert "  ffn" not in rows and "  attention" in rows  # parts without parameters are left out
