"""Every experiment preset is a one-line multirun whose jobs all compose and validate; the
launchers and the Optuna search compose; a failing job of a sweep is recorded, the rest run."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from moa.errors import ConfigError
from moa.training.run_config import parse_run
from moa.training.run_status import read_status
from tests.conftest import CONF_DIR, ROOT

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
SWEPT = {"ablation_metric": 24, "moas_compare": 3, "gqa_kv_heads": 4, "schemes_mqar": 72}


def sweep_jobs(compose_config, experiment: str, *command_line: str) -> list[list[str]]:
    """The overrides of each job of `python train.py -m experiment=NAME [command_line]`,
    expanded by Hydra's own basic sweeper from the preset's hydra.sweeper.params followed by
    the command line (as BasicSweeper.sweep orders them)."""
    params = compose_config(f"experiment={experiment}").hydra.sweeper.get("params") or {}
    overrides = OverridesParser.create().parse_overrides(
        [f"{key}={value}" for key, value in params.items()] + list(command_line))
    [batch] = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return [[f"experiment={experiment}", *job] for job in batch]


def check_ablation_metric(specs) -> None:
    # a constant token budget: the same steps, batch and block in every job
    assert len({(s.data.batch_size, s.data.block_size) for s in specs}) == 1
    assert {s.model.attention.metric.name for s in specs} == {"l2", "cosine", "maha_diag"}
    assert {s.model.attention.use_balls for s in specs} == {False, True}
    assert {s.model.ffn.router.name for s in specs} == {"softmax", "static"}
    assert {s.model.attention.ti_reg_weight > 0 for s in specs} == {False, True}


def check_moas_compare(specs) -> None:
    assert {(s.model.d_model, s.model.n_layers, s.model.n_heads) for s in specs} == {(128, 4, 4)}
    assert [s.model.attention.name for s in specs] == ["dot_product", "mixture", "mixture"]
    assert [s.model.attention.router.name for s in specs[1:]] == ["static", "softmax"]


def check_schemes_mqar(specs) -> None:
    assert {(s.data.seq_len, s.data.num_kv_pairs) for s in specs} == {(64, 4), (128, 8), (256, 16)}
    assert {(s.model.d_model, s.optim.lr) for s in specs} == {(64, 3e-3), (128, 1e-3)}
    assert {(s.data.vocab_size, s.model.n_layers, s.model.ffn.name) for s in specs} == \
        {(8192, 2, "none")}
    # 64 sequences a step at every length (256, 512, 1,024 queries); fillers are 0 (fig. 2)
    assert {(s.data.seq_len, s.data.batch_size * s.data.num_kv_pairs) for s in specs} == \
        {(64, 256), (128, 512), (256, 1024)}
    assert not any(s.data.random_non_queries for s in specs)


def check_gqa_kv_heads(specs) -> None:
    assert [s.model.attention.n_kv_heads for s in specs] == [1, 2, 3, 6]


def test_schemes_mqar_runs_every_scheme_on_the_grid(compose_config, tmp_path):
    """Fast: every scheme at the grid's largest point, MHA at every point (the whole grid
    is composed by the slow case of the test above)."""
    jobs = sweep_jobs(compose_config, "schemes_mqar")
    schemes = {path.stem for path in (CONF_DIR / "attention").glob("*.yaml")}
    assert {job[1] for job in jobs} == {f"attention={scheme}" for scheme in schemes}
    GlobalHydra.instance().clear()
    largest = [job for job in jobs if "data.seq_len=256" in job and "mqar_width=d128" in job]
    specs = parse_jobs(largest + [job for job in jobs if "attention=mha" in job], tmp_path)
    assert len(largest) == len(schemes)
    check_schemes_mqar(specs)


def test_a_command_line_list_replaces_the_presets_sweep_list(compose_config):
    """The README's part of schemes_mqar for a night: 2 schemes x 3 lengths x 2 widths."""
    jobs = sweep_jobs(compose_config, "schemes_mqar", "attention=mha,gqa")
    assert len(jobs) == 12
    assert {job[1] for job in jobs} == {"attention=mha", "attention=gqa"}


def test_schemes_mqar_stops_at_its_validation_threshold(compose_config):
    """Zoology's early stop: a threshold every validation passes ends training at the first
    validation, and the test split is still scored."""
    from moa.training import train

    cfg = compose_config("experiment=schemes_mqar", "~callbacks.progress_bar",
                         "data.num_train_examples=320", "data.num_val_examples=32",
                         "data.num_test_examples=32", "data.batch_size=16",
                         "trainer.max_steps=20", "trainer.val_check_interval=5",
                         "callbacks.early_stopping.stopping_threshold=-1.0")
    assert cfg.callbacks.early_stopping.monitor == "val/acc"
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 5
    assert 0.0 <= metrics["test_acc"] <= 1.0


CHECKS = {"ablation_metric": check_ablation_metric, "moas_compare": check_moas_compare,
          "schemes_mqar": check_schemes_mqar, "gqa_kv_heads": check_gqa_kv_heads}


def parse_jobs(jobs: list[list[str]], tmp_path) -> list:
    """parse_run of each job's config, composed in one Hydra session (as a sweep does)."""
    specs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            cfg = compose(config_name="train", return_hydra_config=True,
                          overrides=[f"paths.root_dir={ROOT}", f"hydra.run.dir={tmp_path}", *job])
            HydraConfig.instance().set_config(cfg)
            specs.append(parse_run(cfg))
    return specs


@pytest.mark.parametrize("experiment", [
    pytest.param(name, marks=pytest.mark.slow) if name == "schemes_mqar" else name
    for name in EXPERIMENTS])
def test_every_job_of_every_preset_validates(compose_config, tmp_path, experiment):
    jobs = sweep_jobs(compose_config, experiment)
    assert len(jobs) == SWEPT.get(experiment, 1)
    GlobalHydra.instance().clear()
    specs = parse_jobs(jobs, tmp_path)
    if experiment in CHECKS:
        CHECKS[experiment](specs)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_sweeps_over_seeds(compose_config, experiment):
    """`python train.py -m experiment=NAME seed=1,2,3`: every job of the preset, once per
    seed (the seed varying fastest), and the first job's three seeds validate."""
    jobs = sweep_jobs(compose_config, experiment, "seed=1,2,3")
    assert len(jobs) == 3 * SWEPT.get(experiment, 1)
    assert [job[-1] for job in jobs[:3]] == ["seed=1", "seed=2", "seed=3"]
    assert len({tuple(job[:-1]) for job in jobs}) == SWEPT.get(experiment, 1)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for seed, job in enumerate(jobs[:3], start=1):
            cfg = compose(config_name="train", return_hydra_config=True,
                          overrides=[f"paths.root_dir={ROOT}", "hydra.run.dir=unused", *job])
            HydraConfig.instance().set_config(cfg)
            parse_run(cfg)
            assert cfg.seed == seed


def test_slurm_launcher_composes_into_submitits_launcher(compose_config):
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = compose_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                         "hydra.launcher.timeout_min=60")
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    assert launcher.params["partition"] == "gpu" and launcher.params["timeout_min"] == 60
    parse_run(cfg)


def test_optuna_search_minimises_val_loss_over_lr_warmup_and_decay(compose_config):
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

    cfg = compose_config("hparams_search=optuna")
    assert isinstance(instantiate(cfg.hydra.sweeper), OptunaSweeper)
    assert cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {"optim.lr", "optim.warmup_steps",
                                             "optim.weight_decay"}
    parse_run(cfg)


def test_config_error_survives_pickling():
    """Launchers that run jobs in other processes (joblib, submitit) pickle the error."""
    error = ConfigError("model.n_heads", 5, "divisors of 64", "not a divisor")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.key, str(copy)) == (error.key, str(error))


@pytest.mark.parametrize("launcher", [
    pytest.param(["hydra/launcher=basic"], marks=pytest.mark.slow),
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],
], ids=["basic", "joblib"])
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, cache_dir, launcher):
    """joblib runs the jobs in a worker process: the error must come back from it."""
    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "trainer=smoke", "model=gpt", "tokenizer=byte",
         "model.n_heads=5,4", "model.n_layers=1", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "trainer.limit_test_batches=1", "sampling.prompts=[]",
         *launcher, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0  # the sweep reports the failure at its end
    failed, finished = read_status(sweep / "0"), read_status(sweep / "1")
    assert failed["status"] == "failed" and "model.n_heads=5" in failed["error"]
    assert finished["status"] == "finished", result.stderr[-2000:]
    assert "val_loss" in json.loads((sweep / "1" / "metrics.json").read_text())


@pytest.mark.slow
def test_optuna_sweep_reports_the_lowest_val_loss(tmp_path, cache_dir):
    from omegaconf import OmegaConf

    env = {**os.environ, "MOA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled"}
    sweep = tmp_path / "optuna"
    subprocess.run([sys.executable, "train.py", "-m", "hparams_search=optuna",
                    "hydra.sweeper.n_trials=2", "trainer=smoke", "model=gpt", "tokenizer=byte",
                    "model.n_layers=1", "trainer.max_steps=4", "trainer.val_check_interval=2",
                    "trainer.limit_test_batches=1", "sampling.prompts=[]",
                    f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    losses = [json.loads((sweep / job / "metrics.json").read_text())["val_loss"]
              for job in ("0", "1")]
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == min(losses)
