"""The logger group: csv always, wandb offline without an API key (never the network),
tensorboard, and `many` for all three at once."""

from __future__ import annotations

import pytest

from moa.training import train
from moa.training.loggers import choice_tags, run_name, wandb_mode


@pytest.mark.parametrize("env,mode", [
    ({}, "offline"),
    ({"WANDB_API_KEY": "x" * 40}, "online"),
    ({"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "disabled"}, "disabled"),
])
def test_wandb_is_offline_without_an_api_key(monkeypatch, env, mode):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_mode() == mode


def test_tags_are_the_config_choices():
    tags = choice_tags({"attention": "mqa", "model": "gpt", "experiment": None,
                        "hydra/launcher": "basic"})
    assert tags == ["attention=mqa", "model=gpt"]


def test_many_loggers_write_csv_tensorboard_and_an_offline_wandb_run(compose_config, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config("trainer=smoke", "model=gpt", "tokenizer=byte", "logger=many",
                         "model.n_layers=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
                         "evaluate=false")
    assert [name for name in cfg.logger] == ["csv", "wandb", "tensorboard"]
    train(cfg)
    run = tmp_path / "run"
    assert (run / "metrics.csv").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    [offline] = list((run / "wandb").glob("offline-run-*"))
    assert list(offline.glob("*.wandb"))  # what `wandb sync` uploads later


@pytest.mark.parametrize("job,prefix,group", [
    ([], "train-", None),
    (["hydra.job.num=3", "hydra.sweep.dir=/sweeps/a"], "train-3-", "/sweeps/a"),
])
def test_wandb_run_is_named_after_its_job_and_grouped_by_its_sweep(compose_config, job, prefix,
                                                                   group):
    cfg = compose_config("logger=wandb", "attention=mqa", *job)
    overrides = cfg.hydra.job.override_dirname  # "attention=mqa,logger=wandb,paths..."
    assert "attention=mqa" in overrides
    assert cfg.logger.wandb.name == prefix + overrides
    assert cfg.logger.wandb.group == group


def test_a_run_without_overrides_is_named_after_its_task():
    assert run_name("train", None, "") == "train"
    assert run_name("train", 0, "") == "train-0"
