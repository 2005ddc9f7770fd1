"""Strategies, precision, compile and gradient accumulation through the trainer config."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from moa.training import train
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


def test_bf16_mixed_on_cpu_learns(compose_config, tmp_path):
    metrics, objects = train(compose_config(
        "trainer=smoke", *TINY, "trainer.precision=bf16-mixed", "trainer.max_steps=6",
        "trainer.val_check_interval=6", "trainer.limit_test_batches=1", "optim.lr=1e-2"))
    assert objects["trainer"].precision == "bf16-mixed"
    # Lightning clips here (gradient_clip_val 1.0), which it refuses with a fused AdamW
    assert objects["trainer"].optimizers[0].defaults["foreach"]
    losses = train_losses(tmp_path / "run")
    assert all(math.isfinite(loss) for loss in losses) and math.isfinite(metrics["val_loss"])
    assert losses[-1] < losses[0] - 0.5, losses


class AccumulatedGradients(pl.Callback):
    """Keeps the gradients the optimizer step is about to take (after accumulation)."""

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.gradients = {name: parameter.grad.clone()
                          for name, parameter in module.named_parameters()}


def test_accumulating_two_half_batches_is_one_full_batch(compose_config, tmp_path):
    """One optimizer step over 2 x 4 blocks with trainer.accumulate_grad_batches=2 takes the
    gradient of one step over the same 8 blocks at once. The gradients are compared, not the
    weights after AdamW's first step: that step is lr * g / (|g| + eps), which turns a rounding
    difference in a gradient near 0 into one near lr, and which such a weight gets depends on
    the CPU's kernels."""
    gradients = []
    for batch, accumulate in ((8, 1), (4, 2)):
        run = tmp_path / f"{batch}x{accumulate}"
        _, objects = train(compose_config(
            "trainer=smoke", *TINY, f"data.batch_size={batch}",
            f"trainer.accumulate_grad_batches={accumulate}", "trainer.max_steps=1",
            "trainer.val_check_interval=1", "evaluate=false", f"paths.output_dir={run}",
            f"+callbacks.accumulated_gradients._target_={__name__}.AccumulatedGradients"))
        assert objects["trainer"].global_step == 1
        recorder = next(callback for callback in objects["trainer"].callbacks
                        if isinstance(callback, AccumulatedGradients))
        gradients.append(recorder.gradients)
    scale = max(gradient.abs().max() for gradient in gradients[0].values())
    for name, gradient in gradients[0].items():
        assert gradient.abs().max() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_keys(compose_config, tmp_path):
    """model.compile=true: torch.compile on the CPU, the same losses as eager, and
    checkpoints hold the uncompiled module's keys."""
    curves = []
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        train(compose_config("trainer=smoke", *TINY, f"model.compile={compiled}",
                             "trainer.max_steps=3", "trainer.val_check_interval=3",
                             "evaluate=false", f"paths.output_dir={run}"))
        curves.append(train_losses(run))
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert not [key for key in checkpoint["state_dict"] if "_orig_mod" in key]
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-4)
