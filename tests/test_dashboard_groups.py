"""Grouping seeds, the baseline and its verdicts, the report formats, and runs whose files
cannot be read, on run directories written by hand (tests/dashboard_runs.py) so that each
group's statistics are known in advance."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import subprocess
import sys

import pytest

from moa.dashboard.__main__ import main
from moa.dashboard.groups import group_runs, set_baseline
from moa.dashboard.runs import load_runs
from tests.conftest import ROOT
from tests.dashboard_runs import loss_rows, run_config, seed_sweep, write_run


def dashboard(capsys, *arguments: str) -> str:
    """`python -m moa.dashboard ARGUMENTS`, in this process: what it prints."""
    capsys.readouterr()
    main(list(arguments))
    return capsys.readouterr().out


def test_seeds_data_seeds_paths_and_run_names_make_one_group(tmp_path):
    runs = seed_sweep(tmp_path, [1.5, 1.6, 1.7])
    # a data seed differs too (mqar's data.seed), and the third run lives elsewhere
    third = tmp_path / "elsewhere" / "job"
    write_run(third, run_config(third, seed=9, **{"data.seed": 7}),
              metrics={"val_loss": 1.8}, rows=loss_rows(1.8))
    [group] = group_runs(load_runs([tmp_path]))
    assert [run.path for run in group.counted] == [third, *runs]  # in path order
    summary = group.metrics["val_loss"]
    # 1.5, 1.6, 1.7, 1.8: mean 1.65, s = sqrt(0.05 / 3), half width t_{.975,3} s / 2
    assert summary.n == 4 and summary.mean == pytest.approx(1.65)
    assert summary.std == pytest.approx(math.sqrt(0.05 / 3))
    half = 3.182446 * math.sqrt(0.05 / 3) / 2
    assert summary.ci95 == pytest.approx((1.65 - half, 1.65 + half), abs=1e-6)


@pytest.mark.parametrize("key, value", [
    ("optim.lr", 1e-3), ("model.n_layers", 3), ("data.batch_size", 8),
    ("attention.n_kv_heads", 1), ("trainer.max_steps", 8), ("ckpt_path", "/runs/a/last.ckpt"),
])
def test_a_run_that_differs_in_any_other_key_is_another_group(tmp_path, key, value):
    seed_sweep(tmp_path, [1.5, 1.6], name="a")
    seed_sweep(tmp_path, [1.4, 1.5], name="b", **{key: value})
    groups = group_runs(load_runs([tmp_path]))
    assert [len(group.counted) for group in groups] == [2, 2]
    assert groups[1].name == f"{key}={value}"  # the key that sets it apart, and its value


def test_a_group_choice_names_the_group_and_covers_its_keys(tmp_path):
    seed_sweep(tmp_path, [1.5, 1.6], name="mha")
    seed_sweep(tmp_path, [1.4, 1.5], name="mqa", **{"attention.n_kv_heads": 1})
    for run in (tmp_path / "mqa").iterdir():
        write_run(run, run_config(run, seed=int(run.name) + 1, **{"attention.n_kv_heads": 1}),
                  choices={"attention": "mqa"}, metrics={"val_loss": 1.4})
    assert [group.name for group in group_runs(load_runs([tmp_path]))] == \
        ["attention=mha", "attention=mqa"]


def test_a_sweep_with_one_failed_seed(tmp_path, capsys):
    seed_sweep(tmp_path, [1.5, 1.7])
    failed = tmp_path / "sweep" / "2"
    write_run(failed, run_config(failed, seed=3), metrics=None, status="failed",
              error="RuntimeError: out of memory", rows=loss_rows(9.0)[:2])
    [group] = group_runs(load_runs([tmp_path]))
    assert group.metrics["val_loss"].n == 2 and group.metrics["val_loss"].mean == 1.6
    assert [run.path for run in group.not_counted] == [failed]
    report = json.loads(dashboard(capsys, str(tmp_path), "--format", "json"))
    [entry] = report["groups"]
    assert entry["runs"] == [str(tmp_path / "sweep" / job) for job in ("0", "1")]
    assert entry["metrics"]["val_loss"]["n"] == 2
    assert entry["not_counted"] == [{"run": str(failed), "status": "failed",
                                     "error": "RuntimeError: out of memory"}]
    table = dashboard(capsys, str(tmp_path), "--format", "table")
    assert "2 (+1 failed, not counted)" in table
    assert "sweep/2 (all runs): failed: RuntimeError: out of memory" in table


@pytest.fixture
def three_schemes(tmp_path):
    """Baseline MHA around 2.0, one scheme clearly better (1.5), one within noise (2.005),
    three seeds each; the config key attention.n_kv_heads sets them apart."""
    seed_sweep(tmp_path, [2.0, 2.01, 1.99], name="base", **{"attention.n_kv_heads": 4})
    seed_sweep(tmp_path, [1.5, 1.51, 1.49], name="good", **{"attention.n_kv_heads": 2})
    seed_sweep(tmp_path, [2.0, 2.03, 1.985], name="same", **{"attention.n_kv_heads": 1})
    return tmp_path


def test_json_has_the_documented_shape_and_verdicts(three_schemes, capsys):
    report = json.loads(dashboard(capsys, str(three_schemes), "--format", "json",
                                  "--baseline", "attention.n_kv_heads=4"))
    assert report["baseline"] == "attention.n_kv_heads=4"
    groups = {group["name"]: group for group in report["groups"]}
    assert list(groups) == ["attention.n_kv_heads=4", "attention.n_kv_heads=2",
                            "attention.n_kv_heads=1"]
    good = groups["attention.n_kv_heads=2"]
    assert set(good) >= {"name", "runs", "metrics", "vs_baseline"}
    assert len(good["runs"]) == 3
    assert set(good["metrics"]) == {"val_loss", "val_acc", "test_loss", "test_acc"}
    assert set(good["metrics"]["val_loss"]) == {"n", "mean", "std", "ci95"}
    assert good["metrics"]["val_loss"]["mean"] == pytest.approx(1.5)
    val_loss = good["vs_baseline"]["val_loss"]
    assert set(val_loss) == {"delta", "delta_ci95", "verdict"}
    assert val_loss["delta"] == pytest.approx(-0.5)
    low, high = val_loss["delta_ci95"]
    assert low < -0.5 < high < 0
    assert val_loss["verdict"] == "better"
    assert good["vs_baseline"]["val_acc"]["verdict"] == "better"  # higher accuracy
    same = groups["attention.n_kv_heads=1"]["vs_baseline"]
    assert {v["verdict"] for v in same.values()} == {"not distinguishable"}
    assert groups["attention.n_kv_heads=4"]["vs_baseline"] is None  # the baseline itself


def test_markdown_csv_and_table_carry_the_same_verdicts(three_schemes, capsys):
    arguments = [str(three_schemes), "--baseline", "attention.n_kv_heads=4"]
    markdown = dashboard(capsys, *arguments, "--format", "markdown")
    assert "| group | metric | n | mean | std | 95% CI |" in markdown
    assert "| attention.n_kv_heads=2 | val_loss | 3 | 1.5000 | 0.0100 |" in markdown
    assert "better" in markdown and "not distinguishable" in markdown
    rows = list(csv.DictReader(io.StringIO(dashboard(capsys, *arguments, "--format", "csv"))))
    good = [row for row in rows if row["group"] == "attention.n_kv_heads=2"
            and row["metric"] == "val_loss"][0]
    assert float(good["delta"]) == pytest.approx(-0.5) and good["verdict"] == "better"
    table = dashboard(capsys, *arguments, "--format", "table")
    assert "(baseline)" in table and "-0.5000" in table and "better" in table


def test_several_baseline_matches_compare_each_group_with_its_own_cell(tmp_path):
    """`--baseline attention.n_kv_heads=4` over two sequence lengths: each scheme is
    compared with the baseline at its own length."""
    for length, shift in ((64, 0.0), (128, 1.0)):
        seed_sweep(tmp_path, [2.0 + shift, 2.01 + shift], name=f"base{length}",
                   **{"attention.n_kv_heads": 4, "data.block_size": length})
        seed_sweep(tmp_path, [1.5 + shift, 1.51 + shift], name=f"mqa{length}",
                   **{"attention.n_kv_heads": 1, "data.block_size": length})
    groups = group_runs(load_runs([tmp_path]))
    set_baseline(groups, {"attention.n_kv_heads": "4"})
    compared = [group for group in groups if dict(group.parts)["attention.n_kv_heads"] == "1"]
    assert len(compared) == 2
    for group in compared:
        assert dict(group.baseline.parts) == {**dict(group.parts), "attention.n_kv_heads": "4"}
        assert group.differences["val_loss"].delta == pytest.approx(-0.5)


def test_a_baseline_no_group_has_is_refused_naming_the_groups(three_schemes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(three_schemes), "--format", "table", "--baseline", "attention=sqa"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--baseline attention=sqa: no group has it" in error
    assert "attention.n_kv_heads=2" in error


CORRUPTIONS = {  # file: (what it holds instead, what the listing says)
    "metrics.json": ('{"val_loss": 1.5,', "metrics.json: JSONDecodeError: Expecting"),
    "status.json": ("[1, 2]", "status.json: not a JSON object but list"),
    "config.yaml": ("seed: [1\n", "config.yaml: "),
    "metrics.csv": ("epoch,step,val/loss\n0,zero,1.5\n", "metrics.csv: ValueError: invalid"),
    "run.json": ("\x00\x01", "run.json: JSONDecodeError"),
    ".hydra/hydra.yaml": ("hydra: {runtime: [", ".hydra/hydra.yaml: ParserError"),
}


def test_runs_with_corrupted_files_are_listed_as_unreadable(tmp_path, capsys):
    """One run per kind of corrupted file beside two good runs: `--format table` exits 0,
    names each broken run's file and the reason, and shows the good runs as usual; so do
    the JSON and the page."""
    seed_sweep(tmp_path, [1.5, 1.6, *([1.7] * len(CORRUPTIONS))])
    broken = {}
    for job, (name, (text, reason)) in enumerate(sorted(CORRUPTIONS.items()), start=2):
        (tmp_path / "sweep" / str(job) / name).write_text(text)
        broken[f"sweep/{job}"] = reason
    result = subprocess.run([sys.executable, "-m", "moa.dashboard", str(tmp_path), "--format",
                             "table"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for run, reason in broken.items():
        assert any(f"{run} " in line and "unreadable" in line for line in lines), run
        assert any(f"{run}" in line and reason in line for line in lines), (run, reason)
    for good in ("sweep/0", "sweep/1"):
        assert any(f"{good} " in line and "finished" in line for line in lines)
    report = json.loads(dashboard(capsys, str(tmp_path), "--format", "json"))
    assert [run for group in report["groups"] for run in group["runs"]] == \
        [str(tmp_path / "sweep" / job) for job in ("0", "1")]
    # config.yaml and .hydra/hydra.yaml say what a run is: without them, in no group
    assert sorted(run["error"].split(":")[0] for run in report["unreadable"]) == \
        [".hydra/hydra.yaml", "config.yaml"]
    page = tmp_path / "page.html"
    main([str(tmp_path), "--out", str(page)])
    text = page.read_text()
    for reason in broken.values():
        assert html.escape(reason) in text, reason
