"""bench/arms.py: the `--arm LABEL OVERRIDE...` models the benchmarks take beside their
presets, and bench/throughput.py's rows for them."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT


def load(monkeypatch, name: str):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arms_follow_the_presets_each_with_its_overrides(monkeypatch):
    arms = load(monkeypatch, "arms")
    labelled = arms.arm_overrides([["topk", "model=moa_metric", "ffn.router.name=topk"]],
                                  ["gpt", "moa_metric"])
    assert labelled == [("gpt", ["model=gpt"]), ("moa_metric", ["model=moa_metric"]),
                        ("topk", ["model=moa_metric", "ffn.router.name=topk"])]


@pytest.mark.parametrize(("arm", "message"), [
    (["topk", "ffn.router.name=topk"], "--arm topk: name its preset"),
    (["gpt", "model=gpt", "model.dropout=0.1"], "labels must differ .*: gpt"),
])
def test_an_arm_without_its_preset_or_with_a_taken_label_is_refused(monkeypatch, arm, message):
    arms = load(monkeypatch, "arms")
    with pytest.raises(SystemExit, match=message):
        arms.arm_overrides([arm], ["gpt", "moa_metric"])


def test_throughput_times_an_arm_and_its_variants_beside_gpt(monkeypatch, tmp_path, capsys):
    """... with freed host memory kept in the process, as training keeps it by default,
    and the ops that cost the arm more than gpt."""
    throughput = load(monkeypatch, "throughput")
    kept = []
    monkeypatch.setattr(throughput, "keep_freed", lambda: kept.append(True) or True)
    output = tmp_path / "throughput.json"
    monkeypatch.setattr(sys, "argv", [
        "throughput.py", "--presets", "gpt", "--d-model", "32", "--n-layers", "1",
        "--n-heads", "2", "--block-size", "16", "--batch-size", "2", "--warmup", "1",
        "--steps", "2", "--variants", "accumulate=2", "--variants-of", "topk",
        "--arm", "topk", "model=moa_metric", "ffn.router.name=topk", "--ops", "3",
        "--json", str(output)])
    throughput.main()
    records = {r["preset"]: r for r in json.loads(output.read_text())}
    assert {name for name, r in records.items() if "ops" in r} == {"gpt", "topk"}
    assert records["gpt"]["ops"]["aten::mm"]["calls"] > 0
    assert records["topk"]["ops"]["aten::index_select"]["ms"] > 0  # top-k's gathers
    assert "topk: ATen self ms per step" in capsys.readouterr().out
    assert list(records) == ["gpt", "topk", "gpt accumulate=2", "topk accumulate=2"]
    assert records["topk"]["overrides"] == ["model=moa_metric", "ffn.router.name=topk"]
    assert records["gpt"]["overrides"] == ["model=gpt"]
    # top-k routing has no static FLOP count: its batch's, counted in a warm-up step
    assert records["topk"]["flops"] > records["gpt"]["flops"] > 0
    assert records["topk"]["gflops_per_s"] > 0
    assert records["topk accumulate=2"]["gflops_per_s"] > 0  # its two half batches
    assert records["topk accumulate=2"]["ratio_to_gpt_variant"] > 0
    for record in records.values():
        assert record["step_ms"] > 0 and record["ratio_to_gpt"] > 0
        assert record["keep_host_memory"] is True
    assert kept == [True]


def test_throughput_can_time_glibcs_default_host_memory(monkeypatch, tmp_path):
    throughput = load(monkeypatch, "throughput")
    monkeypatch.setattr(throughput, "keep_freed", lambda: pytest.fail("memory kept"))
    output = tmp_path / "throughput.json"
    monkeypatch.setattr(sys, "argv", [
        "throughput.py", "--presets", "gpt", "--d-model", "32", "--n-layers", "1",
        "--n-heads", "2", "--block-size", "16", "--batch-size", "2", "--warmup", "1",
        "--steps", "1", "--variants", "--no-keep-host-memory", "--json", str(output)])
    throughput.main()
    assert [r["keep_host_memory"] for r in json.loads(output.read_text())] == [False]


def test_throughput_by_default_times_every_language_model_preset(monkeypatch, tmp_path):
    """With no --presets: gpt first, then every preset of conf/model/ but the Reactive
    Transformer's (not a language model of one training step), each running its step."""
    from moa.params import CONF_DIR

    throughput = load(monkeypatch, "throughput")
    generate = load(monkeypatch, "generate")
    everything = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))
    expected = ["gpt"] + [name for name in everything if name not in ("gpt", "rxt_alpha_micro")]
    assert "rxt_alpha_micro" in everything and throughput.presets() == expected
    assert generate.presets() == sorted(expected)
    output = tmp_path / "throughput.json"
    monkeypatch.setattr(sys, "argv", [
        "throughput.py", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
        "--block-size", "16", "--batch-size", "2", "--warmup", "0", "--steps", "1",
        "--variants", "--no-keep-host-memory", "--json", str(output)])
    throughput.main()
    assert [r["preset"] for r in json.loads(output.read_text())] == expected
