"""`python -m moa.dashboard` on a real sweep of two schemes x two seeds: every run's values
in the HTML page and in the terminal table, the seeds pooled into one group a scheme,
statuses shown as recorded (a failed seed reported, not counted), and the page, with every
figure, drawn by Chromium without console errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moa.dashboard.__main__ import main
from moa.dashboard.groups import group_runs
from moa.dashboard.runs import load_runs
from moa.dashboard.table import SUMMARY, build_table, format_cell
from moa.training.run_status import write_status
from tests.conftest import ROOT
from tests.dashboard_runs import mqar_sweep, routed_runs

JOBS = ("0", "1", "2", "3")  # attention=mha seed=1, mha 2, mqa 1, mqa 2 (Hydra's order)
FIGURES = ("loss-curves", "pareto", "mqar-recall", "router-usage")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """`python train.py -m trainer=smoke attention=mha,mqa seed=1,2 hydra.sweep.dir=DIR`,
    made smaller (byte tokens, 1 layer, 4 steps, tokens/s over 2 steps)."""
    directory = tmp_path_factory.mktemp("dashboard") / "sweep"
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "train.py", "-m", "trainer=smoke", "attention=mha,mqa",
                    "seed=1,2", "model=gpt", "tokenizer=byte", "model.n_layers=1",
                    "trainer.max_steps=4", "trainer.val_check_interval=2",
                    "trainer.log_every_n_steps=1",
                    "trainer.limit_test_batches=1", "sampling.prompts=[]",
                    "callbacks.throughput.window_size=2", f"hydra.sweep.dir={directory}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return directory


def val_losses(sweep: Path) -> list[float]:
    return [json.loads((sweep / job / "metrics.json").read_text())["val_loss"] for job in JOBS]


def test_html_holds_both_runs_curves_and_values(sweep, tmp_path):
    out = tmp_path / "dashboard.html"
    main([str(sweep), "--out", str(out)])
    page = out.read_text()
    for job, loss in zip(JOBS, val_losses(sweep), strict=True):
        assert f'data-value="{loss}"' in page  # the table cell, full precision for sorting
        assert f"sweep/{job}" in page
    assert "tokens seen" in page and "<script" in page
    assert '<script src="http' not in page  # plotly.js inlined: the page opens offline
    assert page.count("<script type=\"text/javascript\">/**\n* plotly.js") <= 1  # once


def _section(stdout: str, title: str) -> list[str]:
    """The lines of one titled table of `--format table` (header, rule, rows)."""
    lines = stdout.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def test_terminal_table_has_one_row_per_run_and_one_group_per_scheme(sweep):
    result = subprocess.run([sys.executable, "-m", "moa.dashboard", str(sweep),
                             "--format", "table", "--baseline", "attention=mha"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=True)
    header, rule, *rows = _section(result.stdout, "Runs")
    assert header.split()[:3] == ["run", "attention", "seed"]
    assert len(rows) == 4
    for row, (scheme, seed), loss in zip(rows, [("mha", "1"), ("mha", "2"), ("mqa", "1"),
                                               ("mqa", "2")], val_losses(sweep), strict=True):
        assert row.split()[1:3] == [scheme, seed] and format_cell(loss) in row.split()
        assert "finished" in row
    header, rule, *groups = _section(result.stdout, "Groups (seeds pooled)")
    assert [row.split()[:2] for row in groups] == [["attention=mha", "2"], ["attention=mqa", "2"]]
    statistics = _section(result.stdout, "Statistics (mean, sample std, 95% Student-t "
                                         "interval of the mean)")[2:]
    mqa_loss = [row for row in statistics if row.startswith("attention=mqa  val_loss")]
    assert len(mqa_loss) == 1 and mqa_loss[0].split()[-1] in ("better", "worse", "distinguishable")


def test_json_pools_the_seeds_of_each_scheme(sweep, capsys):
    """Real configs differ in many path keys and run names, and in the seed: each scheme
    is still one group, with its two runs counted."""
    main([str(sweep), "--format", "json", "--baseline", "attention=mha"])
    report = json.loads(capsys.readouterr().out)
    assert report["baseline"] == "attention=mha"
    mha, mqa = report["groups"]
    losses = val_losses(sweep)
    assert (mha["name"], mqa["name"]) == ("attention=mha", "attention=mqa")
    assert mha["runs"] == [str(sweep / job) for job in ("0", "1")]
    assert mqa["metrics"]["val_loss"]["n"] == 2
    assert mqa["metrics"]["val_loss"]["mean"] == pytest.approx(sum(losses[2:]) / 2)
    assert mqa["vs_baseline"]["val_loss"]["delta"] == \
        pytest.approx(sum(losses[2:]) / 2 - sum(losses[:2]) / 2)
    assert mha["vs_baseline"] is None


def test_table_reports_sizes_and_kv_cache_from_run_json(sweep):
    header, rows = build_table(load_runs([sweep]))
    assert header == ["run", "attention", "seed", *SUMMARY]
    column = {name: index for index, name in enumerate(header)}
    mha, _, mqa, _ = rows
    for row in rows:
        assert row[column["active parameters"]] == row[column["parameters"]]  # no top-k
        assert row[column["tokens/s"]] > 0
        assert 0 < row[column["minutes"]] < 5  # status.json's wall seconds, as minutes
    # one key/value head instead of four: a quarter of the cache
    assert mqa[column["KV bytes/token"]] * 4 == mha[column["KV bytes/token"]]


def test_a_sweep_finished_with_resume_auto_shows_no_resume_column(sweep, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    config = copy / "1" / "config.yaml"
    config.write_text(config.read_text().replace("resume: false", "resume: auto"))
    assert "resume: auto" in config.read_text()
    header, _ = build_table(load_runs([copy]))
    assert "attention" in header and "resume" not in header


def test_running_and_failed_runs_never_show_as_finished(sweep, tmp_path):
    """A failed seed is reported with its error and not counted: MHA's group has one run."""
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    write_status(copy / "1", "failed", "RuntimeError: out of memory")
    write_status(copy / "3", "running")
    runs = load_runs([copy])
    header, rows = build_table(runs)
    status = header.index("status")
    assert [row[status] for row in rows] == ["finished", "failed", "finished", "running"]
    mha, mqa = group_runs(runs)
    assert [len(mha.counted), len(mqa.counted)] == [1, 1]
    assert mha.metrics["val_loss"].n == 1 and mha.metrics["val_loss"].ci95 is None
    assert [run.path.name for run in mha.not_counted + mqa.not_counted] == ["1", "3"]
    out = tmp_path / "page.html"
    main([str(copy), "--out", str(out)])
    page = out.read_text()
    assert 'class="running"' in page and "RuntimeError: out of memory" in page


def _chromium(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--window-size=1400,900", f"--user-data-dir={profile}", *flags,
         page.as_uri()],
        capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def every_figure(sweep, tmp_path_factory) -> Path:
    """The page of the real sweep beside an MQAR sweep and a routed model's seeds (written
    by hand): all four figures, MHA the baseline."""
    others = tmp_path_factory.mktemp("others")
    mqar_sweep(others)
    routed_runs(others)
    out = tmp_path_factory.mktemp("page") / "dashboard.html"
    main([str(sweep), str(others / "mqar"), str(others / "routed"), "--out", str(out)])
    return out


def test_the_page_has_every_figure(every_figure):
    page = every_figure.read_text()
    for figure in FIGURES:
        assert f'id="{figure}"' in page, figure
    assert "attention=mqa model=gpt data.seq_len=128" in page  # a group named by its keys


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium_without_console_errors(every_figure, sweep,
                                                                  tmp_path):
    out = every_figure
    screenshot = tmp_path / "dashboard.png"
    result = _chromium(out, tmp_path / "profile", f"--screenshot={screenshot}")
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "ERROR:CONSOLE" in line], \
        console
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The page as the browser built it: plotly drew every figure, the table has every run.
    dom = _chromium(out, tmp_path / "profile", "--virtual-time-budget=5000",
                    "--dump-dom").stdout
    for figure in FIGURES:
        match = re.search(rf'<div id="{figure}"[^>]*class="([^"]*)"', dom)
        assert match and "js-plotly-plot" in match[1], (figure, dom[:2000])
    assert dom.count('class="main-svg"') >= 2 * len(FIGURES)
    for loss in val_losses(sweep):
        assert f'data-value="{loss}"' in dom
