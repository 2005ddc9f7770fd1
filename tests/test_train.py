"""End to end: a smoke train, then evaluation of its checkpoint, in a temporary directory."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch

from moa.errors import ConfigError
from moa.models.params import measure_kv_cache
from moa.models.weights_format import WEIGHTS_FORMAT
from moa.training import METRIC_KEYS, evaluate, train
from moa.training.run_status import read_status, recording_status
from tests.conftest import ROOT


def _train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def test_smoke_train_then_eval(compose_config, tmp_path):
    cfg = compose_config("trainer=smoke")
    metrics, objects = train(cfg)
    run_dir = tmp_path / "run"

    assert set(metrics) == set(METRIC_KEYS)
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert checkpoint["moa_format_version"] == WEIGHTS_FORMAT
        assert checkpoint["model_config"]["d_model"] == 64  # the tiny size of trainer=smoke
    for name in ("config.yaml", "tokenizer.json", "run.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert read_status(run_dir) == {"status": "finished", "error": None, "time": ANY,
                                    "seconds": ANY}
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["kv_cache_measured_on"].startswith("the trained model")
    trained = measure_kv_cache(objects["module"].model)
    assert record["kv_cache_bytes_per_token"] == trained.bytes_per_token > 0

    losses = _train_losses(run_dir)
    vocab = objects["module"].model_config.vocab_size
    assert losses[0] > losses[-1] + 0.5, losses  # it learned something
    assert metrics["val_loss"] < math.log(vocab) - 1.0
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    assert 0.0 < metrics["test_acc"] < 1.0

    eval_cfg = compose_config(f"run_dir={run_dir}", "sampling.max_new_tokens=8",
                              "trainer.limit_test_batches=4", config_name="eval")
    (run_dir / "metrics.json").unlink()
    evaluated, _ = evaluate(eval_cfg)
    assert evaluated == pytest.approx(metrics, rel=1e-4)  # same weights, same splits
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics, rel=1e-4)


def test_run_json_records_the_trained_balls_cache(compose_config, tmp_path):
    """With ball pruning, run.json's KV-cache figures are the trained model's, measured:
    the kept fraction of its balls and the bytes that follow from it."""
    cfg = compose_config("trainer=smoke", "trainer.max_steps=2", "evaluate=false",
                         "tokenizer=byte", "attention.paths.1.use_balls=true",
                         "attention.paths.3.use_balls=true", "+attention.paths.1.radius_init=0.3",
                         "+attention.paths.3.radius_init=0.3")
    _, objects = train(cfg)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    trained = measure_kv_cache(objects["module"].model)
    assert record["kv_cache_measured_on"].startswith("the trained model")
    assert record["kv_cache_kept_fraction"] == trained.kept_fraction
    assert record["kv_cache_bytes_per_token"] == trained.bytes_per_token


def test_same_seed_same_loss_curve(compose_config, tmp_path):
    overrides = ("trainer=smoke", "trainer.max_steps=6", "evaluate=false", "tokenizer=byte")
    curves = []
    for attempt in range(2):
        cfg = compose_config(*overrides, f"paths.output_dir={tmp_path / str(attempt)}",
                             "trainer.log_every_n_steps=1")
        train(cfg)
        curves.append(_train_losses(tmp_path / str(attempt)))
    assert len(curves[0]) == 6 and curves[0] == curves[1]


def test_a_failed_run_records_failed_with_its_error(compose_config, tmp_path, monkeypatch):
    def broken_fit(*args, **kwargs):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr("lightning.pytorch.Trainer.fit", broken_fit)
    with pytest.raises(RuntimeError):
        train(compose_config("trainer=smoke"))
    status = read_status(tmp_path / "run")
    assert status["status"] == "failed"
    assert status["error"] == "RuntimeError: the disk is full"
    assert status["seconds"] > 0  # the data set-up before fit


def test_status_seconds_add_the_wall_time_to_the_earlier_seconds(tmp_path):
    with recording_status(tmp_path, earlier_seconds=60.0):
        running = read_status(tmp_path)
        time.sleep(0.2)
    assert (running["status"], running["seconds"]) == ("running", 60.0)
    finished = read_status(tmp_path)
    assert finished["status"] == "finished" and 60.2 <= finished["seconds"] < 62


def test_eval_without_checkpoint_names_the_key(compose_config, tmp_path):
    with pytest.raises(ConfigError, match="run_dir"):
        evaluate(compose_config(f"run_dir={tmp_path}", config_name="eval"))


def test_command_line_train_and_eval(tmp_path, cache_dir):
    """The commands outside checks use: train.py trainer=smoke hydra.run.dir=DIR, then
    eval.py run_dir=DIR."""
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    run_dir = tmp_path / "cli"
    subprocess.run([sys.executable, "train.py", "trainer=smoke", "model.n_layers=1",
                    "trainer.max_steps=4", "trainer.val_check_interval=2", "evaluate=false",
                    f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    result = subprocess.run([sys.executable, "eval.py", f"run_dir={run_dir}",
                             "sampling.max_new_tokens=4", f"hydra.run.dir={tmp_path / 'eval'}"],
                            cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == set(METRIC_KEYS)
    assert "--- greedy" in result.stdout
    # Lightning's messages reach the job's log file (Hydra's), and the console once
    assert "[lightning.pytorch" in (run_dir / "train.log").read_text()
    assert "[lightning.pytorch" in (tmp_path / "eval" / "eval.log").read_text()
    assert (result.stdout + result.stderr).count("GPU available") == 1


# What `make train` printed besides what a person needs (issue 23): Lightning's advert for
# its cloud logger, datasets' "Filter" progress bars, torch's LeafSpec deprecation that
# Lightning triggers, and FLOPs nobody counted (a column of 0s, a UserWarning).
CONSOLE_NOISE = ("litlogger", "Tip:", "Filter", "LeafSpec", "FLOPs", "UserWarning",
                 "model summary callbacks")


def test_the_console_has_what_a_person_needs_and_nothing_else(tmp_path, cache_dir):
    """A smoke run of the default model from the command line: its config and parameter
    summary, the model summary, the progress bar, validation results and samples; none of
    the noise. That the step's FLOPs could not be counted is in the run's log instead."""
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "trainer=smoke", "model.n_layers=1",
                             "trainer.max_steps=4", "trainer.val_check_interval=2",
                             "sampling.max_new_tokens=4", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    console = result.stdout + result.stderr
    for noise in CONSOLE_NOISE:
        assert noise not in console, (noise, console)
    for needed in ("M parameters; data:", "Trainable params", "Total params", "Epoch 0",
                   '"val_loss"', '"test_acc"', "--- greedy", "--- sampled"):
        assert needed in console, (needed, console)
    assert "FLOPs not counted: this model's work depends on its data" in \
        (run_dir / "train.log").read_text()


def test_command_line_config_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "model.n_heads=5",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: invalid config model.n_heads=5")
    assert "Traceback" not in result.stderr


def test_fast_dev_run_runs_one_batch(compose_config):
    metrics, objects = train(compose_config("trainer=smoke", "debug=fast_dev_run"))
    assert objects["trainer"].global_step == 1
    assert metrics == {}  # the preset skips the final evaluation


@pytest.mark.slow
def test_overfit_batch_drives_the_loss_down(compose_config, tmp_path):
    cfg = compose_config("trainer=smoke", "debug=overfit_batch", "trainer.max_steps=120",
                         "trainer.val_check_interval=60", "tokenizer=byte", "evaluate=false",
                         "trainer.log_every_n_steps=1", "optim.lr=1e-2")
    train(cfg)
    losses = _train_losses(tmp_path / "run")
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


def test_mqar_trains_and_reports_recall_accuracy(compose_config):
    cfg = compose_config("trainer=smoke", "model=gpt", "data=mqar", "data.vocab_size=64",
                         "data.seq_len=32",
                         "data.num_kv_pairs=4", "data.num_train_examples=512",
                         "data.num_val_examples=64", "data.num_test_examples=64",
                         "model.max_seq_len=32", "trainer.max_steps=10")
    metrics, objects = train(cfg)
    assert objects["module"].model_config.vocab_size == 64  # from the data, no tokenizer
    assert objects["datamodule"].tokenizer is None
    assert 0.0 <= metrics["test_acc"] <= 1.0 and math.isfinite(metrics["test_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["mha", "metric", "moa"])
def test_gpu_bf16_training_drives_the_loss_down(compose_config, tmp_path, monkeypatch,
                                                 attention):
    """On a GPU in bf16-mixed (what `trainer=gpu` sets), metric attention and the MoA
    block train through their Triton kernels (impl auto) and overfit one batch."""
    from moa.kernels import metric_triton

    calls = []
    kernel = metric_triton.metric_attention_triton
    monkeypatch.setattr(metric_triton, "metric_attention_triton",
                        lambda *args: calls.append(args[0].dtype) or kernel(*args))
    cfg = compose_config("trainer=smoke", "trainer.accelerator=gpu",
                         "trainer.precision=bf16-mixed", f"attention={attention}",
                         "debug=overfit_batch", "trainer.max_steps=120",
                         "trainer.val_check_interval=60", "tokenizer=byte", "evaluate=false",
                         "trainer.log_every_n_steps=1", "optim.lr=1e-2")
    _, objects = train(cfg)
    assert objects["trainer"].strategy.root_device.type == "cuda"
    assert set(calls) == (set() if attention == "mha" else {torch.bfloat16})
    losses = _train_losses(tmp_path / "run")
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


def test_command_line_multirun(tmp_path, cache_dir):
    """`python train.py -m ... hydra.sweep.dir=DIR`: one run directory per job."""
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, "train.py", "-m", "trainer=smoke", "attention=mha,mqa",
                    "tokenizer=byte", "trainer.max_steps=2", "trainer.val_check_interval=2",
                    "trainer.limit_test_batches=1", "sampling.prompts=[]",
                    f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    for job in ("0", "1"):
        assert set(json.loads((sweep / job / "metrics.json").read_text())) == set(METRIC_KEYS)
    choices = [(sweep / job / ".hydra" / "overrides.yaml").read_text() for job in ("0", "1")]
    assert "attention=mha" in choices[0] and "attention=mqa" in choices[1]
    for job in ("0", "1"):  # each job's Lightning messages in its own log file only
        assert (sweep / job / "train.log").read_text().count("`Trainer.fit` stopped") == 1
