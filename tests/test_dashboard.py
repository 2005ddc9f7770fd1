"""`python -m moa.dashboard` on a real two-run sweep: both runs' values in the HTML page
and in the terminal table, statuses shown as recorded, and the page loads in Chromium
without console errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moa.dashboard.__main__ import main
from moa.dashboard.runs import load_runs
from moa.dashboard.table import SUMMARY, build_table, format_cell
from moa.training.run_status import write_status
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """`python train.py -m trainer=smoke attention=mha,mqa hydra.sweep.dir=DIR`, made
    smaller (byte tokens, 1 layer, 4 steps, tokens/s over 2 steps)."""
    directory = tmp_path_factory.mktemp("dashboard") / "sweep"
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "train.py", "-m", "trainer=smoke", "attention=mha,mqa",
                    "model=gpt", "tokenizer=byte", "model.n_layers=1", "trainer.max_steps=4",
                    "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
                    "trainer.limit_test_batches=1", "sampling.prompts=[]",
                    "callbacks.throughput.window_size=2", f"hydra.sweep.dir={directory}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    return directory


def val_losses(sweep: Path) -> list[float]:
    return [json.loads((sweep / job / "metrics.json").read_text())["val_loss"]
            for job in ("0", "1")]


def test_html_holds_both_runs_curves_and_values(sweep, tmp_path):
    out = tmp_path / "dashboard.html"
    main([str(sweep), "--out", str(out)])
    page = out.read_text()
    for job, loss in zip(("0", "1"), val_losses(sweep), strict=True):
        assert f'data-value="{loss}"' in page  # the table cell, full precision for sorting
        assert f"sweep/{job}" in page
    assert "tokens seen" in page and "<script" in page
    assert '<script src="http' not in page  # plotly.js inlined: the page opens offline


def test_terminal_table_has_one_row_per_run_and_the_differing_key(sweep):
    result = subprocess.run([sys.executable, "-m", "moa.dashboard", str(sweep),
                             "--format", "table"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    header, rule, *rows = result.stdout.strip().splitlines()
    assert header.split()[:2] == ["run", "attention"]
    assert len(rows) == 2
    for row, scheme, loss in zip(rows, ("mha", "mqa"), val_losses(sweep), strict=True):
        assert row.split()[1] == scheme and format_cell(loss) in row.split()
        assert "finished" in row


def test_table_reports_sizes_and_kv_cache_from_run_json(sweep):
    header, rows = build_table(load_runs([sweep]))
    assert header == ["run", "attention", *SUMMARY]
    column = {name: index for index, name in enumerate(header)}
    mha, mqa = rows
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
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    write_status(copy / "0", "running")
    write_status(copy / "1", "failed", "RuntimeError: out of memory")
    header, rows = build_table(load_runs([copy]))
    status = header.index("status")
    assert [row[status] for row in rows] == ["running", "failed"]
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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium_without_console_errors(sweep, tmp_path):
    out = tmp_path / "dashboard.html"
    main([str(sweep), "--out", str(out)])
    screenshot = tmp_path / "dashboard.png"
    result = _chromium(out, tmp_path / "profile", f"--screenshot={screenshot}")
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "ERROR:CONSOLE" in line], \
        console
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The page as the browser built it: plotly drew its figure, the table has both runs.
    dom = _chromium(out, tmp_path / "profile", "--virtual-time-budget=5000",
                    "--dump-dom").stdout
    assert 'class="main-svg"' in dom, dom[:2000]  # only plotly's script makes this
    for loss in val_losses(sweep):
        assert f'data-value="{loss}"' in dom
