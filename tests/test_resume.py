"""resume=true continues a run exactly: same loss curve, data order and dropout included."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moa.errors import ConfigError
from moa.training import train
from moa.training.run_status import read_status
from tests.conftest import ROOT

# dropout on, so the restored RNG state matters; a step logged at every step
RUN = ("trainer=smoke", "model=gpt", "tokenizer=byte", "evaluate=false", "model.dropout=0.1",
       "model.n_layers=1", "data.batch_size=8", "trainer.log_every_n_steps=1",
       "trainer.deterministic=true")


def train_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) rows of metrics.csv, in order."""
    with open(run_dir / "metrics.csv") as handle:
        return [(int(row["step"]), float(row["train/loss"]))
                for row in csv.DictReader(handle) if row.get("train/loss")]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as handle:
        return [(int(row["step"]), float(row["val/loss"]))
                for row in csv.DictReader(handle) if row.get("val/loss")]


class Crash(Exception):
    pass


def _as_written_before_the_loader_kept_its_state(path: Path) -> None:
    """Move the train loader's position to where older checkpoints kept it: the datamodule."""
    checkpoint = torch.load(path, weights_only=True)
    (position,) = checkpoint["loops"]["fit_loop"]["state_dict"].pop("combined_loader")
    checkpoint["LMDataModule"] = position
    torch.save(checkpoint, path)


def _alarms(caught: list[warnings.WarningMessage]) -> list[str]:
    """Lightning's warnings that a run may lose or repeat something."""
    alarms = ("not resumable", "will be deleted", "exists and is not empty")
    return [str(w.message) for w in caught if any(alarm in str(w.message) for alarm in alarms)]


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes."""
    return {str(path.relative_to(run_dir)): path.read_bytes()
            for path in sorted(run_dir.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("record", ["checkpoints/last.ckpt", "metrics.json", "metrics.csv",
                                    "status.json"])
def test_a_new_run_is_refused_where_any_record_of_another_run_is(compose_config, tmp_path,
                                                                 record):
    run_dir = tmp_path / "run"
    (run_dir / record).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / record).write_text("another run's")
    (run_dir / ".hydra").mkdir()  # Hydra's own files do not make a run
    with pytest.raises(ConfigError) as error:
        train(compose_config(*RUN))
    assert error.value.key == "hydra.run.dir" and "resume=true" in str(error.value)
    assert record.split("/")[0] in str(error.value)
    assert _files(run_dir) == {record: b"another run's"}  # nothing written before the refusal


def test_a_new_run_in_a_finished_runs_directory_is_refused_before_anything_is_written(
        compose_config, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_config(*RUN, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    before = _files(run_dir)
    with pytest.raises(ConfigError, match="holds another run .*resume=true"):
        train(compose_config(*RUN, "trainer.max_steps=3", "trainer.val_check_interval=3"))
    assert _files(run_dir) == before


def test_a_failed_invocation_leaves_a_finished_runs_status_as_it_was(compose_config, tmp_path,
                                                                     monkeypatch):
    """Whatever fails before training continues (a bad value, another model, a checkpoint
    that cannot be loaded, the data) is no failure of the run: eval still takes it."""
    from moa.training import evaluate

    run_dir = tmp_path / "run"
    steps = ("trainer.max_steps=2", "trainer.val_check_interval=2")
    train(compose_config(*RUN, *steps))
    before = _files(run_dir)
    failing = [("optim.lr=-1",), ("model.n_layers=3",), ("trainer.max_steps=0",),
               ("data.batch_size=0",), ("seed=abc",)]
    for overrides in failing:
        with pytest.raises(ConfigError):
            train(compose_config(*RUN, *steps, "resume=true", *overrides))
        assert _files(run_dir) == before, overrides

    def no_data(self, *args, **kwargs):
        raise OSError("the corpus is gone")

    monkeypatch.setattr("moa.data.LMDataModule.prepare_data", no_data)
    with pytest.raises(OSError):
        train(compose_config(*RUN, *steps, "resume=true"))
    monkeypatch.undo()
    assert read_status(run_dir)["status"] == "finished" and _files(run_dir) == before
    metrics, _ = evaluate(compose_config(f"run_dir={run_dir}", "trainer=smoke",
                                         "sampling.prompts=[]", config_name="eval"))
    assert set(metrics) >= {"val_loss", "test_loss"}


# epoch_batches: None, one long epoch (the checkpoint at step 5 is mid-epoch); 5, the
# checkpoint closes epoch 0; 3, it is mid-way through epoch 1
@pytest.mark.parametrize("epoch_batches, layout", [(None, "loader"), (5, "loader"),
                                                   (3, "loader"), (None, "datamodule")])
def test_resume_after_a_crash_gives_the_uninterrupted_curve(compose_config, tmp_path,
                                                            monkeypatch, epoch_batches, layout):
    steps = ("trainer.max_steps=9", "trainer.val_check_interval=4")
    if epoch_batches is not None:
        steps += (f"+trainer.limit_train_batches={epoch_batches}",)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose_config(*RUN, *steps, f"paths.output_dir={tmp_path / 'whole'}"))
    assert not _alarms(caught)  # a new run: nothing in its directory is lost

    from moa.training.lit import LanguageModelModule
    original = LanguageModelModule.training_step

    def crash_at_step_7(self, batch, batch_idx):
        if self.trainer.global_step == 7:
            raise Crash("the node went away")
        return original(self, batch, batch_idx)

    run = tmp_path / "run"
    monkeypatch.setattr(LanguageModelModule, "training_step", crash_at_step_7)
    with pytest.raises(Crash):
        train(compose_config(*RUN, *steps))
    failed = read_status(run)
    assert failed["status"] == "failed"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5  # the smoke preset saves last.ckpt every 5 steps
    # the train loader's position: Lightning keeps it with the fit loop
    epoch, batches = divmod(5, epoch_batches) if epoch_batches else (0, 5)
    loop = saved["loops"]["fit_loop"]["state_dict"]
    assert loop["combined_loader"] == [{"epoch": epoch, "batches": batches}]
    if layout == "datamodule":
        _as_written_before_the_loader_kept_its_state(run / "checkpoints" / "last.ckpt")

    monkeypatch.setattr(LanguageModelModule, "training_step", original)
    resume = compose_config(*RUN, *steps, "resume=true")
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(resume)
    resumed_seconds = time.monotonic() - started
    # None applies to a resume: the loader says where it was, metrics.csv keeps its rows,
    # the checkpoints are the run's own
    assert not _alarms(caught)
    finished = read_status(run)
    assert finished["status"] == "finished"
    # the wall time of the run is both invocations': the crashed one's carries over
    assert failed["seconds"] > 0.1  # more than the tolerance, so a lost carry would show
    assert finished["seconds"] - failed["seconds"] == pytest.approx(resumed_seconds, abs=0.1)
    whole = train_curve(tmp_path / "whole")
    assert [step for step, _ in whole] == list(range(9))
    assert train_curve(run) == whole  # bitwise, step by step
    assert val_curve(run) == val_curve(tmp_path / "whole")


def test_a_killed_run_keeps_its_seconds_up_to_its_last_checkpoint(compose_config, tmp_path,
                                                                  monkeypatch):
    """A killed process writes no `failed` status: the running status's seconds, refreshed
    at each checkpoint save, are what resume=true carries on."""
    from moa.training import run_status
    from moa.training.lit import LanguageModelModule

    original = LanguageModelModule.training_step

    def killed_at_step_7(self, batch, batch_idx):
        if self.trainer.global_step == 7:
            raise Crash("SIGKILL")
        return original(self, batch, batch_idx)

    write = run_status.write_status

    def write_unless_failed(*args, **kwargs):  # a killed process writes nothing more
        if run_status.FAILED not in args:
            write(*args, **kwargs)

    monkeypatch.setattr(run_status, "write_status", write_unless_failed)
    monkeypatch.setattr(LanguageModelModule, "training_step", killed_at_step_7)
    started = time.monotonic()
    with pytest.raises(Crash):
        train(compose_config(*RUN, "trainer.max_steps=9", "trainer.val_check_interval=4"))
    elapsed = time.monotonic() - started
    left = read_status(tmp_path / "run")
    assert left["status"] == "running"
    assert 0.1 < left["seconds"] < elapsed  # the checkpoint at step 5 refreshed them


def test_resume_without_a_checkpoint_is_a_config_error(compose_config):
    with pytest.raises(ConfigError, match="resume=True .*no checkpoint to resume from"):
        train(compose_config(*RUN, "resume=true"))


def test_resume_into_another_model_names_the_difference(compose_config, tmp_path):
    train(compose_config(*RUN, "trainer.max_steps=5", "trainer.val_check_interval=5"))
    with pytest.raises(ConfigError, match="n_layers: 3 here, 1 in the checkpoint"):
        train(compose_config(*RUN, "trainer.max_steps=5", "model.n_layers=3", "resume=true"))


def _last_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except FileNotFoundError:
        return -1


@pytest.mark.slow
def test_command_line_resume_after_sigkill(tmp_path, cache_dir):
    """The commands outside checks use: train.py trainer=smoke trainer.max_steps=N
    hydra.run.dir=DIR, SIGKILLed mid-run, then the same with resume=true."""
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    command = [sys.executable, "train.py", *RUN, "trainer.max_steps=40",
               "trainer.val_check_interval=20"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*command, f"hydra.run.dir={whole}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)

    process = subprocess.Popen([*command, f"hydra.run.dir={killed}"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _last_step(killed / "checkpoints" / "last.ckpt") < 15 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_status(killed)["status"] == "running"  # a killed run cannot say otherwise
    assert _last_step(killed / "checkpoints" / "last.ckpt") < 40

    subprocess.run([*command, f"hydra.run.dir={killed}", "resume=true"], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=300)
    assert read_status(killed)["status"] == "finished"
    assert train_curve(killed) == train_curve(whole)
    assert len(train_curve(whole)) == 40


def test_resume_auto_skips_continues_or_starts_each_run(compose_config, tmp_path, monkeypatch):
    """A sweep carried over to a second sitting: its finished job is left alone, its killed
    job continues from its checkpoint, and the job it never began starts."""
    from moa.training.lit import LanguageModelModule

    steps = ("trainer.max_steps=9", "trainer.val_check_interval=4")
    finished, killed, unstarted = (tmp_path / name for name in ("finished", "killed", "new"))
    train(compose_config(*RUN, *steps, f"paths.output_dir={finished}", "evaluate=true"))
    original = LanguageModelModule.training_step

    def crash_at_step_7(self, batch, batch_idx):
        if self.trainer.global_step == 7:
            raise Crash("the night ended")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelModule, "training_step", crash_at_step_7)
    with pytest.raises(Crash):
        train(compose_config(*RUN, *steps, f"paths.output_dir={killed}"))
    monkeypatch.setattr(LanguageModelModule, "training_step", original)

    before = (finished / "status.json").read_text(), (finished / "metrics.csv").read_text()
    metrics, _ = train(compose_config(*RUN, *steps, f"paths.output_dir={finished}",
                                      "resume=auto"))
    after = (finished / "status.json").read_text(), (finished / "metrics.csv").read_text()
    assert after == before  # not trained again
    assert metrics == json.loads((finished / "metrics.json").read_text())

    train(compose_config(*RUN, *steps, f"paths.output_dir={killed}", "resume=auto"))
    assert train_curve(killed) == train_curve(finished)  # continued from step 5, exactly
    assert read_status(killed)["status"] == "finished"

    train(compose_config(*RUN, *steps, f"paths.output_dir={unstarted}", "resume=auto"))
    assert train_curve(unstarted) == train_curve(finished)


def test_resume_auto_refuses_a_directory_holding_another_run(compose_config, tmp_path):
    run = tmp_path / "run"
    train(compose_config(*RUN, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    status = (run / "status.json").read_text()
    with pytest.raises(ConfigError, match=r"holds another run \(model.n_layers: 2 here, 1 there"):
        train(compose_config(*RUN, "trainer.max_steps=2", "model.n_layers=2", "resume=auto"))
    assert (run / "status.json").read_text() == status  # the other run's record is kept
    # keys only one of the configs holds (added since the run) are not compared
    saved = OmegaConf.load(run / "config.yaml")
    del saved.model["head_dim"]
    OmegaConf.save(saved, run / "config.yaml")
    metrics, _ = train(compose_config(*RUN, "trainer.max_steps=2",
                                      "trainer.val_check_interval=2", "resume=auto"))
    assert metrics == {}  # finished, evaluate=false: nothing trained, nothing evaluated
    assert (run / "status.json").read_text() == status


def test_resume_takes_only_its_three_values(compose_config):
    with pytest.raises(ConfigError, match="resume='maybe'; allowed: false \\| true \\| auto"):
        train(compose_config(*RUN, "resume=maybe"))
