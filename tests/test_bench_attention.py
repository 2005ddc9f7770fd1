"""bench/attention.py's ball-pruning rows: the measured kept fraction, the ratio to the
unpruned kernel, and the CPU kernel's queries per block that `--block-rows` sets."""

from __future__ import annotations

import importlib.util
import json

import pytest

from moa.kernels import pruned_attention
from tests.conftest import ROOT


@pytest.fixture
def bench(monkeypatch):
    """The script as a module; the block size it sets is put back afterwards."""
    monkeypatch.setattr(pruned_attention, "ROWS", pruned_attention.ROWS)
    spec = importlib.util.spec_from_file_location("bench_attention",
                                                  ROOT / "bench" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(*arguments: str) -> None:
        monkeypatch.setattr("sys.argv", ["attention.py", *arguments])
        module.main()
    return run


def test_ball_rows_record_the_kept_fraction_and_the_block_rows(bench, tmp_path):
    output = tmp_path / "balls.json"
    bench("--device", "cpu", "--balls", "0.25,0.5", "--lengths", "300", "--repeats", "1",
          "--block-rows", "16", "--json", str(output))
    records = json.loads(output.read_text())
    assert [record["L"] for record in records] == [300] * 3
    assert records[0]["kept_fraction"] == 1.0
    assert records[0]["ratio_to_unpruned"] == {"fwd": 1.0, "fwd_bwd": 1.0}
    for record, target in zip(records[1:], [0.25, 0.5], strict=True):
        assert abs(record["kept_fraction"] - target) < 0.1
        assert record["ratio_to_unpruned"]["fwd"] == pytest.approx(
            record["fwd_ms"] / records[0]["fwd_ms"])
    assert all(record["block_rows"] == 16 for record in records)
    assert pruned_attention.ROWS == 16  # the kernel ran with them


@pytest.mark.parametrize("rows", ["0", "-4"])
def test_block_rows_must_be_positive(bench, capsys, rows):
    with pytest.raises(SystemExit) as exit_:
        bench("--device", "cpu", "--balls", "0.5", "--block-rows", rows)
    assert exit_.value.code == 2
    assert "--block-rows must be positive" in capsys.readouterr().err


def test_block_rows_need_ball_rows(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench("--device", "cpu", "--block-rows", "16")
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
