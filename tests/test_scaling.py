"""Strategies, precision, compile and gradient accumulation through the trainer config."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.conftest import ROOT

TINY = ("model=gpt", "model.size=tiny", "model.n_layers=1", "tokenizer=byte",
        "data.batch_size=8", "optim.warmup_steps=2", "trainer.log_every_n_steps=1",
        "sampling.prompts=[]")


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.mark.parametrize("preset", ["ddp", "fsdp", "multinode"])
def test_gpu_strategy_presets_build_their_strategy(compose_config, preset):
    """The GPU presets compose into Trainer arguments naming Lightning's own strategies."""
    trainer = compose_config(f"trainer={preset}").trainer
    strategy = trainer.strategy if isinstance(trainer.strategy, str) \
        else instantiate(trainer.strategy).__class__.__name__
    assert strategy in ("ddp", "FSDPStrategy")
    assert trainer.accelerator == "gpu" and trainer.num_nodes == (2 if preset == "multinode" else 1)


def test_two_process_cpu_ddp(tmp_path, cache_dir):
    """trainer=ddp_cpu: Lightning starts rank 1 by re-running train.py; both ranks end with
    the same weights, the loss falls, and only rank 0 writes the run's files."""
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    run_dir, probe = tmp_path / "run", tmp_path / "probe"
    result = subprocess.run(
        [sys.executable, "train.py", "trainer=ddp_cpu", *TINY, "trainer.max_steps=12",
         "trainer.val_check_interval=6", "trainer.limit_val_batches=2",
         "trainer.limit_test_batches=2", "trainer.num_sanity_val_steps=0",
         "+callbacks.probe._target_=tests.rank_probe.ParameterHash",
         f"+callbacks.probe.out_dir={probe}", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    hashes = {path.name: path.read_text() for path in probe.iterdir()}
    assert set(hashes) == {"rank0.sha256", "rank1.sha256"}
    assert hashes["rank0.sha256"] == hashes["rank1.sha256"]
    losses = train_losses(run_dir)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    written = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*")
                     if ".hydra" not in path.parts)
    assert written == sorted([
        "checkpoints", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml",
        "hparams.yaml", "metrics.csv", "metrics.json", "run.json", "status.json",
        "tokenizer.json", "train.log",
        "train_ddp_process_1.log",  # Hydra's log of rank 1's console: its only file
    ]), written
