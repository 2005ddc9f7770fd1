"""bench/optimizer.py: one row per preset and AdamW implementation, each timed beside the
for_loop step of the same run."""

from __future__ import annotations

import importlib.util
import json
import sys

from tests.conftest import ROOT


def test_rows_give_each_implementation_against_for_loop(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the script imports throughput.py
    spec = importlib.util.spec_from_file_location("bench_optimizer",
                                                  ROOT / "bench" / "optimizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "optimizer.json"
    monkeypatch.setattr(sys, "argv", [
        "optimizer.py", "--presets", "gpt", "moa_metric", "--d-model", "32", "--n-layers", "1",
        "--n-heads", "2", "--vocab-size", "8192", "--block-size", "16", "--warmup", "1",
        "--steps", "2", "--json", str(output)])
    module.main()
    records = json.loads(output.read_text())
    assert [(r["preset"], r["impl"]) for r in records] == [
        (preset, impl) for preset in ("gpt", "moa_metric") for impl in module.IMPLS]
    for record in records:
        assert record["step_ms"] > 0
        if record["impl"] == "for_loop":
            assert record["ratio_to_for_loop"] == 1.0
    tensors = {r["preset"]: r["parameter_tensors"] for r in records}
    assert tensors["moa_metric"] > 2 * tensors["gpt"]
