"""bench/gelu.py: a row per kernel and size, each against oneDNN's call in the same run."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT


def test_rows_give_each_kernel_against_onednn(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the script imports interleaved.py
    spec = importlib.util.spec_from_file_location("bench_gelu", ROOT / "bench" / "gelu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "gelu.json"
    monkeypatch.setattr(sys, "argv", ["gelu.py", "--rows", "1", "64", "--width", "256",
                                      "--calls", "3", "--warmup", "1", "--json", str(output)])
    module.main()
    records = json.loads(output.read_text())
    assert [(r["rows"], r["kernel"]) for r in records] == [
        (rows, kernel) for rows in (1, 64) for kernel in module.KERNELS]
    onednn = {r["rows"]: r["us"] for r in records if r["kernel"] == "onednn"}
    for record in records:
        assert record["elements"] == record["rows"] * 256 and record["us"] > 0
        assert record["ratio_to_onednn"] == pytest.approx(record["us"] / onednn[record["rows"]])
