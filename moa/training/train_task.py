"""`train(cfg)`: what train.py runs, callable from tests. The run directory's files are
described in `moa/training/run_files.py`."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import moa.training.loggers  # noqa: F401  (the resolvers of conf/logger/wandb.yaml)
from moa.data import LMDataModule
from moa.models.language_model import LanguageModel
from moa.models.params import active_parameters, measure_kv_cache
from moa.training.checkpoint import (
    check_same_model,
    keep_metrics_before,
    load_checkpoint,
    resume_checkpoint,
)
from moa.training.console import quiet_console
from moa.training.eval_task import run_evaluation
from moa.training.freeze import check_freeze, freeze
from moa.training.host_memory import keep_freed
from moa.training.init_from import check_init_from, load_init_weights
from moa.training.job_log import log_lightning_to_the_job_file
from moa.training.lit import LanguageModelModule
from moa.training.objectives import SpecialTokens
from moa.training.resume import Resume, resume_mode, run_records
from moa.training.run_config import RunSpec, parse_run, resolved
from moa.training.run_files import update_run_record, write_run_files
from moa.training.run_status import StatusSeconds, read_status, recording_status

log = logging.getLogger(__name__)


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    if not section:
        return []
    return [instantiate(node) for node in section.values() if node is not None]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Validate the config, train, then evaluate the best checkpoint; return metrics.

    The run directory's status.json says running, then finished or failed, and the run's
    wall seconds, those of earlier invocations included when resuming. A new run's status
    is recorded from the start (a bad config too, so that a failed job of a sweep shows
    why); a run that an earlier invocation started changes status only once this one has
    checked everything and continues it, so a refused resume leaves it as it was. A new
    run in another run's directory is refused (`moa/training/resume.py`). With
    resume=auto a finished run is not trained again: its metrics.json is returned."""
    started = time.monotonic()
    log_lightning_to_the_job_file()
    quiet_console()
    check_init_from(cfg)  # before resume's own checks: the two together are the error
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mode = resume_mode(cfg, run_dir)
    if mode is Resume.FINISHED:
        log.info("%s finished already (resume=auto): nothing to train", run_dir)
        saved = run_dir / "metrics.json"
        return (json.loads(saved.read_text()) if saved.is_file() else {}), {}
    resuming = mode is Resume.CONTINUE
    earlier = (read_status(run_dir) or {}).get("seconds", 0.0) if resuming else 0.0
    prepared = _prepare(cfg, run_dir, resuming) if run_records(run_dir) else None
    earlier += time.monotonic() - started if prepared else 0.0  # this invocation's set-up
    with recording_status(run_dir, earlier) as refresh_status:
        return _train(cfg, prepared or _prepare(cfg, run_dir, resuming), run_dir, resuming,
                      StatusSeconds(refresh_status))


@contextmanager
def _without_false_alarms(resuming: bool, run_dir: Path) -> Iterator[None]:
    """Lightning's warnings about a non-empty run directory where they do not apply: our
    run files (config.yaml, run.json, ...) are there before its loggers, and a resumed run
    continues from its own checkpoints. Its warning that metrics.csv will be deleted stays
    where one is there and the run is not resuming (a new run in an old run's directory)."""
    with warnings.catch_warnings():
        if resuming:
            warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
        if resuming or not (run_dir / "metrics.csv").exists():
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists")
        yield


@dataclass
class _Prepared:
    spec: RunSpec
    datamodule: LMDataModule
    module: LanguageModelModule
    checkpoint: dict[str, Any] | None
    ckpt_path: str | None


def _prepare(cfg: DictConfig, run_dir: Path, resuming: bool) -> _Prepared:
    """Everything that can refuse the run: the config, the data, the checkpoint."""
    spec = parse_run(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    if spec.keep_host_memory:
        keep_freed()

    datamodule = LMDataModule(spec.data, spec.tokenizer, seed=cfg.seed,
                              cache_dir=cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model_config = spec.model.with_vocab(datamodule.vocab_size)
    key = "resume" if resuming else "ckpt_path"
    ckpt_path = resume_checkpoint(run_dir) if resuming else cfg.get("ckpt_path")
    checkpoint = load_checkpoint(Path(ckpt_path), key) if ckpt_path else None
    if checkpoint is not None:
        check_same_model(model_config, checkpoint, Path(ckpt_path), key)
    objective = replace(spec.objective, seed=int(cfg.seed),
                        tokens=SpecialTokens.of(datamodule.tokenizer))
    module = LanguageModelModule(model=model_config.to_dict(), optim=asdict(spec.optim),
                                 objective=asdict(objective))
    return _Prepared(spec, datamodule, module, checkpoint, ckpt_path)


def _train(cfg: DictConfig, prepared: _Prepared, run_dir: Path, resuming: bool,
           status_seconds: StatusSeconds) -> tuple[dict[str, float], dict[str, Any]]:
    spec, datamodule, module = prepared.spec, prepared.datamodule, prepared.module
    checkpoint, ckpt_path = prepared.checkpoint, prepared.ckpt_path
    model = module.model
    record = {
        "data": datamodule.fingerprint,
        "parameters": model.num_parameters(),
        "parameters_without_embedding": model.num_parameters() - model.embedding.weight.numel(),
        "active_parameters": active_parameters(model),
    }
    if isinstance(model, LanguageModel):  # the Reactive Transformer's cache is per message
        record.update(_measured_cache(model, "the initial model"))
    if cfg.get("init_from"):  # weights only: optimiser, step and data position start afresh
        record["init_from"] = load_init_weights(module.model, Path(cfg.init_from))
    record["parameters_frozen"] = freeze(module.model, check_freeze(cfg.get("freeze")))["frozen"]
    write_run_files(cfg, run_dir, datamodule, record)
    log.info("model: %.2fM parameters; data: %s", record["parameters"] / 1e6,
             datamodule.fingerprint)

    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=[*_instantiate_all(cfg.get("callbacks")), status_seconds],
        logger=loggers or False,
    )
    with _without_false_alarms(resuming, run_dir):
        if resuming:
            keep_metrics_before(loggers, checkpoint["global_step"])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if torch.distributed.is_initialized():
        # training is over: rank 0 evaluates alone, and torchmetrics must not wait for the others
        torch.distributed.destroy_process_group()

    metrics: dict[str, float] = {}
    if cfg.get("evaluate", True) and trainer.is_global_zero:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        if best:
            module.load_state_dict(load_checkpoint(Path(best))["state_dict"])
        metrics = run_evaluation(module, datamodule, resolved(cfg, "trainer"), spec.sampling,
                                 run_dir / "metrics.json")
    if trainer.is_global_zero and isinstance(model, LanguageModel):
        # what the balls learned to keep decides the cache: measured again, trained
        update_run_record(run_dir, _measured_cache(model, "the trained model"))
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def _measured_cache(model: LanguageModel, measured_on: str) -> dict[str, Any]:
    """run.json's KV-cache figures (`measure_kv_cache`), labelled with the model measured."""
    measure = measure_kv_cache(model)
    figures = {"kv_cache_bytes_per_token": measure.bytes_per_token,
               "kv_cache_measured_on": f"{measured_on}: batch 1, {measure.tokens} random "
                                       "tokens cached"}
    if measure.kept_fraction is not None:
        figures["kv_cache_kept_fraction"] = measure.kept_fraction
    return figures
