"""bench/attention.py's ball-pruning rows: the measured kept fraction, the ratio to the
unpruned kernel, and the CPU kernel's block levels that `--window-blocks` sets."""

from __future__ import annotations

import importlib.util
import json

import pytest

from moa.kernels import key_compaction
from tests.conftest import ROOT


@pytest.fixture
def bench(monkeypatch):
    """The script as a module; the block levels it sets are put back afterwards."""
    monkeypatch.setattr(key_compaction, "WINDOW_BLOCKS", key_compaction.WINDOW_BLOCKS)
    spec = importlib.util.spec_from_file_location("bench_attention",
                                                  ROOT / "bench" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(*arguments: str) -> None:
        monkeypatch.setattr("sys.argv", ["attention.py", *arguments])
        module.main()
    return run


def test_ball_rows_record_the_kept_fraction_and_the_block_levels(bench, tmp_path):
    output = tmp_path / "balls.json"
    bench("--device", "cpu", "--balls", "0.25,0.5", "--lengths", "300", "--repeats", "1",
          "--window-blocks", "64,16", "--json", str(output))
    records = json.loads(output.read_text())
    assert [record["L"] for record in records] == [300] * 3
    assert records[0]["kept_fraction"] == 1.0
    assert records[0]["ratio_to_unpruned"] == {"fwd": 1.0, "fwd_bwd": 1.0}
    for record, target in zip(records[1:], [0.25, 0.5], strict=True):
        assert abs(record["kept_fraction"] - target) < 0.1
        assert record["ratio_to_unpruned"]["fwd"] == pytest.approx(
            record["fwd_ms"] / records[0]["fwd_ms"])
    assert all(record["window_blocks"] == [64, 16] for record in records)
    assert key_compaction.WINDOW_BLOCKS == (64, 16)  # the kernel ran with them


@pytest.mark.parametrize("levels", ["64,24", "0,16", "64,x", ""])
def test_window_blocks_that_do_not_nest_are_refused(bench, capsys, levels):
    with pytest.raises(SystemExit) as exit_:
        bench("--device", "cpu", "--balls", "0.5", "--window-blocks", levels)
    assert exit_.value.code == 2
    assert "--window-blocks: block sizes like 1024,256,64" in capsys.readouterr().err


def test_window_blocks_need_ball_rows(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench("--device", "cpu", "--window-blocks", "64,16")
    assert exit_.value.code == 2
    assert "use it with --balls" in capsys.readouterr().err


def test_flex_is_refused_on_cpu(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench("--device", "cpu", "--impls", "sdpa", "flex")
    assert exit_.value.code == 2
    assert "--impls flex needs --device cuda" in capsys.readouterr().err


def test_ball_rows_time_the_metric_kernels_only(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench("--device", "cpu", "--balls", "0.5", "--impls", "sdpa", "cpu_fused")
    assert exit_.value.code == 2
    assert "--impls without sdpa" in capsys.readouterr().err


def test_ball_rows_of_each_kernel_asked_for(bench, tmp_path):
    output = tmp_path / "balls.json"
    bench("--device", "cpu", "--balls", "0.5", "--lengths", "300", "--repeats", "1",
          "--impls", "cpu_fused", "eager", "--json", str(output))
    records = json.loads(output.read_text())
    assert [(record["impl"], record["kept_fraction"] == 1.0) for record in records] == [
        ("cpu_fused", True), ("cpu_fused", False), ("eager", True), ("eager", False)]
