"""bench/decode_attention.py: a row per kernel, head layout and context, against PyTorch's
call in the same run."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT


def test_rows_give_each_kernel_against_pytorchs(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the script imports interleaved.py
    spec = importlib.util.spec_from_file_location(
        "bench_decode_attention", ROOT / "bench" / "decode_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "decode.json"
    monkeypatch.setattr(sys, "argv", [
        "decode_attention.py", "--layouts", "4/4", "4/1", "--contexts", "5", "17",
        "--head-dim", "8", "--calls", "3", "--warmup", "1", "--json", str(output)])
    module.main()
    records = json.loads(output.read_text())
    assert [(r["n_q_heads"], r["n_kv_heads"], r["context"], r["kernel"]) for r in records] == [
        (4, n_kv, context, kernel) for n_kv in (4, 1) for context in (5, 17)
        for kernel in module.KERNELS]
    sdpa = {(r["n_kv_heads"], r["context"]): r["us"] for r in records if r["kernel"] == "sdpa"}
    for record in records:
        assert record["us"] > 0 and record["head_dim"] == 8
        assert record["ratio_to_sdpa"] == pytest.approx(
            record["us"] / sdpa[record["n_kv_heads"], record["context"]])
