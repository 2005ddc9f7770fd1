"""bench/generate.py's `--breakdown` (a cached step's time by part of the model) and
`--arm` (a preset changed by overrides, beside the presets)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))  # the script imports arms.py
        spec = importlib.util.spec_from_file_location("bench_generate",
                                                      ROOT / "bench" / "generate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_breakdown_times_each_part_within_the_step_and_leaves_no_hook(bench):
    args = argparse.Namespace(size="tiny", d_model=32, n_layers=2, n_heads=2, prompt=12,
                              new_tokens=5, vocab_size=8192)
    model = bench.build(["model=moa_metric"], args)
    parts = bench.step_breakdown(model, args)
    for part in ("blocks.*.attention", "blocks.*.attention.router", "blocks.*.attention.paths.1",
                 "blocks.*.ffn", "blocks.*.ffn.router", "lm_head.attention.router",
                 "lm_head.vocab", "embedding", "norm"):
        assert part in parts
    assert not [part for part in parts if re.match(r"blocks\.\d", part)]  # summed over blocks
    step = parts.pop("step")
    assert all(0 < ms < step for ms in parts.values())
    assert parts["blocks.*.attention.router"] < parts["blocks.*.attention"]
    assert parts["blocks.*.attention.paths.1"] < parts["blocks.*.attention"]
    assert parts["lm_head.vocab"] < parts["lm_head"]
    assert not any(module._forward_hooks or module._forward_pre_hooks
                   for module in model.modules())


def test_an_arm_is_its_preset_under_its_overrides_and_reports_its_cache(bench, monkeypatch,
                                                                        tmp_path):
    output = tmp_path / "generate.json"
    balls = ["attention.paths.1.use_balls=true", "attention.paths.3.use_balls=true",
             "+attention.paths.1.radius_init=0.01", "+attention.paths.3.radius_init=0.01"]
    monkeypatch.setattr(sys, "argv", [
        "generate.py", "--presets", "moa_metric", "--schemes", "--size", "tiny",
        "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--prompt", "12",
        "--new-tokens", "2", "--repeats", "1", "--contexts", "8", "--steps", "2",
        "--arm", "balls", "model=moa_metric", *balls, "--json", str(output)])
    bench.main()
    records = {r["preset"]: r for r in json.loads(output.read_text())["presets"]}
    assert list(records) == ["moa_metric", "balls"]
    assert records["balls"]["overrides"] == ["model=moa_metric", *balls]
    assert records["moa_metric"]["overrides"] == ["model=moa_metric"]
    assert records["balls"]["parameters"] > records["moa_metric"]["parameters"]  # the balls'
    # a radius of 0.01 keeps no metric key but each step's own: the cache holds the rest
    assert records["balls"]["kv_bytes_per_token"] < records["moa_metric"]["kv_bytes_per_token"]
    for record in records.values():
        assert all(ms > 0 for ms in record["cached_step_ms"].values())


def test_compile_times_each_model_through_its_decoding_step(bench, monkeypatch, tmp_path):
    """`--compile`: `compiled_step_ms` at every context, each model's steps through the
    `decoding_step` made for it (recorded here instead of compiling)."""
    stepped = []

    def recording_step(model):
        def step(ids, cache):
            stepped.append(model)
            return model(ids, cache)
        return step

    monkeypatch.setattr(bench, "decoding_step", recording_step)
    output = tmp_path / "generate.json"
    monkeypatch.setattr(sys, "argv", [
        "generate.py", "--presets", "moa_metric", "gpt", "--schemes", "--size", "tiny",
        "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--prompt", "12",
        "--new-tokens", "2", "--repeats", "1", "--contexts", "8", "12", "--steps", "2",
        "--compile", "--json", str(output)])
    bench.main()
    records = json.loads(output.read_text())["presets"]
    for record in records:
        assert set(record["compiled_step_ms"]) == {"8", "12"}
        assert all(ms > 0 for ms in record["compiled_step_ms"].values())
    assert len(stepped) == 2 * 2 * (2 + 2)  # models x contexts x (2 untimed + 2 timed)
    assert len({id(model) for model in stepped}) == 2
