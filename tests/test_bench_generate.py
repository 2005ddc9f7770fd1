"""bench/generate.py's `--breakdown`: a cached step's time by part of the model."""

from __future__ import annotations

import argparse
import importlib.util
import re

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
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
