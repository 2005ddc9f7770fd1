"""Checkpoints: written atomically, loaded without running code, refused with one clear line
when missing, broken, foreign or from an unfinished run."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from moa.errors import ConfigError
from moa.training import METRIC_KEYS, evaluate, train
from moa.training.checkpoint_io import AtomicCheckpointIO
from moa.training.run_status import FAILED, RUNNING, write_status
from tests.conftest import ROOT

RUN = ("trainer=smoke", "model=gpt", "tokenizer=byte", "model.n_layers=1", "data.batch_size=8",
       "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_test_batches=1",
       "sampling.prompts=[]")
EVAL = ("trainer.limit_test_batches=1", "sampling.prompts=[]")

def test_smoke_trainer_writes_checkpoints_atomically(compose_config):
    trainer = instantiate(compose_config("trainer=smoke").trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_checkpoints_get_the_permissions_a_plain_save_gives(tmp_path):
    """Not the temporary file's owner-only 0600: a group sharing runs can read them."""
    import stat

    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    torch.save({"step": 1}, tmp_path / "plain.ckpt")
    mode = stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.ckpt").stat().st_mode)


class KillPoint:
    """Pickled inside a checkpoint, it copies the checkpoint's directory as a kill at that
    moment of the save would leave it; it unpickles as an empty OrderedDict."""

    def __init__(self, kill) -> None:
        self.kill = kill

    def __reduce__(self):
        self.kill()
        return OrderedDict, ()


def test_a_kill_at_any_stage_of_a_save_never_leaves_a_broken_checkpoint(tmp_path, monkeypatch):
    """Deterministic: the directory is copied at each stage of two saves (a first one, then
    one over it) as a SIGKILL there would leave it: while the checkpoint is pickled, and
    before and after every fsync, chmod and replace. In every copy last.ckpt is absent or a
    whole checkpoint (the old or the new), no other file looks like a checkpoint, and the
    next save clears what the kill left."""
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"  # the save makes both folders
    copies, copying = [], []

    def kill() -> None:
        if copying:  # the copy's own chmod calls
            return
        copying.append(True)
        copy = tmp_path / f"killed-{len(copies)}"
        shutil.copytree(path.parent, copy) if path.parent.exists() else copy.mkdir()
        copies.append(copy)
        copying.clear()

    def killed_around(function):
        def wrapped(*args, **kwargs):
            kill()
            result = function(*args, **kwargs)
            kill()
            return result
        return wrapped

    for name in ("fsync", "chmod", "replace"):
        monkeypatch.setattr(os, name, killed_around(getattr(os, name)))
    for step in (1, 2):
        weights = torch.full((1000,), float(step))
        checkpoint = {"step": step, "before": KillPoint(kill), "weights": weights,
                      "between": KillPoint(kill), "more": weights + 0, "after": KillPoint(kill)}
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    monkeypatch.undo()
    assert len(copies) >= 2 * (3 + 2 * 4)  # pickling, and fsync x2, chmod, replace
    # the bytes go to a file beside the checkpoint (os.replace is atomic within one file
    # system only; the system temp directory may be another)
    assert any(p.name.startswith(".last.ckpt.tmp-") for copy in copies for p in copy.iterdir())
    steps = []
    for copy in copies:
        assert [p.name for p in copy.glob("*.ckpt")] in ([], ["last.ckpt"]), copy
        if (copy / "last.ckpt").exists():
            saved = torch.load(copy / "last.ckpt", weights_only=True)
            assert (saved["weights"] == saved["step"]).all()
            assert (saved["more"] == saved["step"]).all()
            steps.append(saved["step"])
        AtomicCheckpointIO().save_checkpoint({"step": 0}, copy / "last.ckpt")
        assert os.listdir(copy) == ["last.ckpt"]  # the next save clears leftovers
    assert set(steps) == {1, 2}  # some copies hold the first save, some the second


def test_a_failed_save_keeps_the_last_checkpoint_and_leaves_no_temporary(tmp_path):
    """A save that raises (here: an unpicklable value) raises that error, leaves the
    previous checkpoint whole and removes its temporary file."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "hook": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


class CreatesAFile:
    """A pickle that would run `open(marker, "w")` when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"moa_format_version": 1, "model_config": {}, "state_dict": {},
                "payload": CreatesAFile(marker)}, path)
    return path


@pytest.fixture
def trained_run(compose_config, tmp_path) -> Path:
    train(compose_config(*RUN))
    return tmp_path / "run"


def test_malicious_checkpoint_is_refused_without_running_it(compose_config, trained_run,
                                                            tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ConfigError, match="ckpt_path=.*refused to load"):
        evaluate(compose_config(f"run_dir={trained_run}", f"ckpt_path={evil}", *EVAL,
                                config_name="eval"))
    with pytest.raises(ConfigError, match="ckpt_path=.*refused to load") as refused:
        train(compose_config(*RUN, f"ckpt_path={evil}", f"paths.output_dir={tmp_path / 'new'}"))
    # what the file is and why it is refused, and no advice to load it unsafely
    assert "a PyTorch pickle file holding a pickled reference to" in str(refused.value)
    assert "code execution" in str(refused.value) and "weights_only" not in str(refused.value)
    malicious_checkpoint(trained_run / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(ConfigError, match="resume=.*refused to load"):
        train(compose_config(*RUN, "resume=true"))
    assert not marker.exists()


@pytest.mark.slow
def test_command_line_eval_of_a_malicious_checkpoint_is_one_line(trained_run, tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    result = subprocess.run([sys.executable, "eval.py", f"run_dir={trained_run}",
                             f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'eval'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: invalid config ckpt_path='{evil}' (refused to load")
    assert "weights_only" not in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


def test_eval_refuses_missing_broken_and_foreign_checkpoints(compose_config, trained_run,
                                                             tmp_path):
    def refused(ckpt_path: Path) -> str:
        with pytest.raises(ConfigError) as error:
            evaluate(compose_config(f"run_dir={trained_run}", f"ckpt_path={ckpt_path}", *EVAL,
                                    config_name="eval"))
        assert error.value.key == "ckpt_path" and "\n" not in str(error.value)
        return str(error.value)

    last = trained_run / "checkpoints" / "last.ckpt"
    assert "not found" in refused(tmp_path / "missing.ckpt")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(last.read_bytes()[:1000])
    assert "unreadable" in refused(broken)
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["model_config"]["n_layers"] = 2
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    assert "n_layers: 1 here, 2 in the checkpoint" in refused(tmp_path / "foreign.ckpt")


def test_eval_takes_an_unfinished_run_only_when_asked(compose_config, trained_run):
    for status, error in ((RUNNING, None), (FAILED, "RuntimeError: the disk is full")):
        write_status(trained_run, status, error)
        with pytest.raises(ConfigError, match=f"the run is {status}") as refused:
            evaluate(compose_config(f"run_dir={trained_run}", *EVAL, config_name="eval"))
        assert error is None or error in str(refused.value)
    metrics, _ = evaluate(compose_config(f"run_dir={trained_run}", "checkpoint=last", *EVAL,
                                         config_name="eval"))
    assert set(metrics) == set(METRIC_KEYS)


def test_format_1_checkpoints_load_unless_their_weights_meant_another_function(
        compose_config, trained_run, tmp_path):
    """Format 1 applied maha_diag's weights after the rotary encoding: such a checkpoint is
    refused with that reason; any other format-1 checkpoint computes the same and loads."""
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["moa_format_version"] = 1
    torch.save(checkpoint, tmp_path / "format1.ckpt")
    metrics, _ = evaluate(compose_config(f"run_dir={trained_run}",
                                         f"ckpt_path={tmp_path / 'format1.ckpt'}", *EVAL,
                                         config_name="eval"))
    assert set(metrics) == set(METRIC_KEYS)

    checkpoint["model_config"]["attention"] = {"name": "metric", "metric": {"name": "maha_diag"}}
    torch.save(checkpoint, tmp_path / "format1_maha.ckpt")
    with pytest.raises(ConfigError, match="Mahalanobis weights after the rotary encoding"):
        evaluate(compose_config(f"run_dir={trained_run}",
                                f"ckpt_path={tmp_path / 'format1_maha.ckpt'}", *EVAL,
                                config_name="eval"))
    checkpoint["moa_format_version"] = 99
    torch.save(checkpoint, tmp_path / "format99.ckpt")
    with pytest.raises(ConfigError, match="format version 99"):
        evaluate(compose_config(f"run_dir={trained_run}", f"ckpt_path={tmp_path / 'format99.ckpt'}",
                                *EVAL, config_name="eval"))


def test_format_1_metric_attention_keeps_the_free_keys_it_was_trained_with(tmp_path):
    """A format-1 config has no key_norm: wherever metric attention or ALCCA sits (the
    attention, a mixture's paths), the upgraded config says `free`, whatever the default."""
    from moa.models.weights_format import WEIGHTS_FORMAT, upgraded_config

    old = {"attention": {"name": "mixture", "paths": [
        {"name": "metric", "metric": {"name": "l2"}}, {"name": "local_conv"},
        {"name": "alcca", "metric": {"name": "l2"}}]}, "position": {"name": "rope"}}
    paths = upgraded_config(old, 1)["attention"]["paths"]
    assert [path.get("key_norm") for path in paths] == ["free", None, "free"]
    assert "key_norm" not in old["attention"]["paths"][0]  # the stored config is not changed
    assert upgraded_config(old, WEIGHTS_FORMAT) == old
