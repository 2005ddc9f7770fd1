"""`train(cfg)` and `evaluate(cfg)`: what train.py and eval.py run, callable from tests.

Run directory layout (single run or one job of a sweep):
    config.yaml          the resolved config of the run (eval reads it)
    .hydra/              Hydra's own record of the composition and overrides
    train.log            the job's log (Hydra's file handler), Lightning's messages included
    run.json             data fingerprint (corpus and tokenizer hashes), parameter counts
                         (total, without embedding, active per token under top-k routing),
                         KV-cache bytes per token
    tokenizer.json       the tokenizer the model was trained with
    checkpoints/         best.ckpt (lowest val/loss) and last.ckpt (also every few steps)
    metrics.csv          the training/validation log (CSVLogger), router statistics
                         included: train/stats/<layer path>.usage.<i> | .routed.<i> | .entropy
    metrics.json         final val_/test_ loss, ppl and acc
    status.json          running | finished | failed (with the error), wall seconds:
                         moa.run_status
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import moa.loggers  # noqa: F401  (the resolvers of conf/logger/wandb.yaml)
from moa.checkpoint import check_same_model, keep_metrics_before, load_checkpoint, resume_checkpoint
from moa.config import COMPONENTS, ModelConfig
from moa.data import CORPORA, TOKENIZERS, LMDataModule
from moa.errors import ConfigError
from moa.generation import SamplingConfig, generate
from moa.host_memory import keep_freed
from moa.lit import LanguageModelModule
from moa.params import active_parameters, kv_cache_bytes_per_token
from moa.resume import Resume, resume_mode
from moa.retrofit import swap_attention, transfer_weights
from moa.run_config import RunSpec, check_trainer, parse_run, resolved
from moa.run_status import FINISHED, StatusSeconds, read_status, recording_status
from moa.schema import parse

log = logging.getLogger(__name__)
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
EXPORTED_RUN_CONFIG = "moa_run.yaml"  # the run's config.yaml in a `moa.export` directory
METRIC_KEYS = [f"{split}_{name}" for split in ("val", "test") for name in ("loss", "ppl", "acc")]


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    if not section:
        return []
    return [instantiate(node) for node in section.values() if node is not None]


def _log_lightning_to_the_job_file() -> None:
    """Lightning, imported before Hydra set up logging, gave its `lightning.pytorch` and
    `lightning.fabric` loggers a console handler of their own and stopped them propagating,
    so the job's log file (Hydra's `<run dir>/train.log`) missed their messages, why
    training stopped early among them. Hand those loggers the root logger's file handlers
    (this job's: a sweep's earlier job's are dropped); the console stays as it was."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if logger.propagate:
            continue  # its records reach the root's handlers already
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
        for handler in files:
            logger.addHandler(handler)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Validate the config, train, then evaluate the best checkpoint; return metrics.

    The run directory's status.json says running, then finished or failed (a bad config
    too, so that a failed job of a sweep shows why), and the run's wall seconds, those of
    earlier invocations included when resuming. With resume=auto a finished run is not
    trained again: its metrics.json is returned (`moa/resume.py`)."""
    _log_lightning_to_the_job_file()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mode = resume_mode(cfg, run_dir)
    if mode is Resume.FINISHED:
        log.info("%s finished already (resume=auto): nothing to train", run_dir)
        saved = run_dir / "metrics.json"
        return (json.loads(saved.read_text()) if saved.is_file() else {}), {}
    resuming = mode is Resume.CONTINUE
    earlier = (read_status(run_dir) or {}).get("seconds", 0.0) if resuming else 0.0
    with recording_status(run_dir, earlier) as refresh_status:
        return _train(cfg, parse_run(cfg), run_dir, resuming, StatusSeconds(refresh_status))


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


def _train(cfg: DictConfig, spec: RunSpec, run_dir: Path, resuming: bool,
           status_seconds: StatusSeconds) -> tuple[dict[str, float], dict[str, Any]]:
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
    module = LanguageModelModule(model=model_config.to_dict(), optim=asdict(spec.optim))

    record = {
        "data": datamodule.fingerprint,
        "parameters": module.model.num_parameters(),
        "parameters_without_embedding": module.model.num_parameters(exclude_embedding=True),
        "active_parameters": active_parameters(module.model),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(module.model),
    }
    _write_run_files(cfg, run_dir, datamodule, record)
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
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


@rank_zero_only
def _write_run_files(cfg: DictConfig, run_dir: Path, datamodule: LMDataModule,
                     record: dict[str, Any]) -> None:
    """config.yaml, tokenizer.json and run.json; rank 0 only (under DDP every rank runs this
    same config, and Lightning's launcher gives them the same run directory)."""
    run_config = {str(key): resolved(cfg, str(key)) for key in cfg if key != "hydra"}
    OmegaConf.save(OmegaConf.create(run_config), run_dir / "config.yaml")
    if datamodule.tokenizer is not None:
        datamodule.tokenizer.save(run_dir / "tokenizer.json")
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))


def run_evaluation(module: LanguageModelModule, datamodule: LMDataModule,
                   trainer_config: dict[str, Any], sampling: SamplingConfig,
                   metrics_path: Path | None) -> dict[str, float]:
    """Val and test metrics over the whole splits (or limit_test_batches), written to
    `metrics_path` (unless None), then samples. On one device: a distributed sampler would
    pad the splits with repeated blocks (after DDP training, rank 0 evaluates alone)."""
    check_trainer(trainer_config)
    limit = trainer_config.get("limit_test_batches")
    evaluator = instantiate(
        {k: v for k, v in trainer_config.items() if k not in ("fast_dev_run", "overfit_batches")},
        limit_val_batches=limit, limit_test_batches=limit, logger=False,
        enable_checkpointing=False, callbacks=[], devices=1, num_nodes=1, strategy="auto",
    )
    results = evaluator.validate(module, datamodule=datamodule, verbose=False)[0]
    results |= evaluator.test(module, datamodule=datamodule, verbose=False)[0]
    metrics = {key: float(results[key.replace("_", "/", 1)]) for key in METRIC_KEYS}
    if metrics_path is not None:
        metrics_path.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    if datamodule.tokenizer is not None and sampling.prompts:
        print_samples(module, datamodule, sampling)
    return metrics


def print_samples(module: LanguageModelModule, datamodule: LMDataModule,
                  sampling: SamplingConfig) -> None:
    tokenizer = datamodule.tokenizer
    model = module.model
    generator = torch.Generator(device=module.device).manual_seed(sampling.seed)
    greedy = SamplingConfig(**{**asdict(sampling), "temperature": 0.0})
    for prompt in sampling.prompts:
        ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]], device=module.device)
        for label, how in (("greedy", greedy), (f"sampled t={sampling.temperature}", sampling)):
            out = generate(model, ids, how, generator=generator, stop_token=tokenizer.eos_id)
            continuation = tokenizer.decode(out[0, ids.size(1):].tolist())
            print(f"--- {label} | {prompt!r}\n{prompt}{continuation}")


def locate_checkpoint(cfg: DictConfig) -> tuple[Path, Path]:
    """(run directory, checkpoint file) from `run_dir` or `ckpt_path`."""
    if cfg.get("ckpt_path"):
        checkpoint = Path(cfg.ckpt_path)
        return (Path(cfg.run_dir) if cfg.get("run_dir") else checkpoint.parent.parent), checkpoint
    if not cfg.get("run_dir"):
        raise ConfigError("run_dir", None, "a training run directory (or ckpt_path=FILE)")
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("run_dir", str(run_dir), "a training run directory with config.yaml",
                          "not a run directory")
    names = {"best": ["best.ckpt", "last.ckpt"], "last": ["last.ckpt"]}
    if cfg.checkpoint not in names:
        raise ConfigError("checkpoint", cfg.checkpoint, "best | last")
    status = read_status(run_dir)
    if cfg.checkpoint == "best" and status is not None and status["status"] != FINISHED:
        why = f": {status['error']}" if status.get("error") else ""
        raise ConfigError("run_dir", str(run_dir),
                          "a finished run, or checkpoint=last to evaluate an unfinished one",
                          f"the run is {status['status']}{why}")
    for name in names[cfg.checkpoint]:
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir, run_dir / "checkpoints" / name
    raise ConfigError("run_dir", str(run_dir), "a run with checkpoints/best.ckpt or last.ckpt",
                      "no checkpoint found")


def _load_run(cfg: DictConfig) -> tuple[Path, DictConfig, dict[str, Any]]:
    """(directory, run config, checkpoint dict) of `run_dir`/`ckpt_path`: a training run
    directory, or a directory written by `python -m moa.export`."""
    exported = Path(cfg.run_dir or "") / EXPORTED_RUN_CONFIG
    if cfg.get("run_dir") and not cfg.get("ckpt_path") and exported.is_file():
        from moa.export import load_exported  # needs transformers, the `hf` extra

        return exported.parent, *load_exported(exported.parent)
    run_dir, checkpoint_path = locate_checkpoint(cfg)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    checkpoint = load_checkpoint(checkpoint_path)
    run_model = ModelConfig.from_sections(run_cfg.model, **{
        name: run_cfg[name] for name in COMPONENTS if name in run_cfg})
    check_same_model(run_model.with_vocab(checkpoint["model_config"]["vocab_size"]), checkpoint,
                     checkpoint_path)
    return run_dir, run_cfg, checkpoint


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Load a run's checkpoint (or a `moa.export` directory's weights) with its saved
    config; write DIR/metrics.json."""
    _log_lightning_to_the_job_file()
    run_dir, run_cfg, checkpoint = _load_run(cfg)
    # evaluation and sampling run eagerly: compiling would cost more than it saves
    model_config = ModelConfig.from_dict({**checkpoint["model_config"], "compile": False})
    module = LanguageModelModule(model=model_config.to_dict(),
                                 optim=OmegaConf.to_container(run_cfg.optim))
    module.load_state_dict(checkpoint["state_dict"])
    pl.seed_everything(cfg.seed, workers=True)

    data = CORPORA.parse(run_cfg.data, "data")
    tokenizer = None
    if data.uses_tokenizer:
        tokenizer = TOKENIZERS.parse(
            {"name": "pretrained", "path": str(run_dir / "tokenizer.json")}, "tokenizer")
    datamodule = LMDataModule(data, tokenizer, seed=int(run_cfg.seed),
                              cache_dir=run_cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("test")
    sampling = parse(SamplingConfig, resolved(cfg, "sampling"), "sampling")
    trainer_config = resolved(cfg, "trainer")
    override = cfg.get("attention_override")
    if not override:
        metrics = run_evaluation(module, datamodule, trainer_config, sampling,
                                 run_dir / "metrics.json")
        return metrics, {"module": module, "datamodule": datamodule}
    # Retrofit: evaluate the trained model, then with the other attention swapped in; the
    # run's own metrics.json is left as it is.
    baseline = run_evaluation(module, datamodule, trainer_config, SamplingConfig(), None)
    module = _retrofit(cfg, module, checkpoint["state_dict"], run_cfg)
    metrics = run_evaluation(module, datamodule, trainer_config, sampling, None)
    metrics |= {f"baseline_{key}": baseline[key] for key in METRIC_KEYS}
    metrics |= {f"delta_{key}": metrics[key] - baseline[key] for key in METRIC_KEYS}
    (run_dir / f"metrics_{override}.json").write_text(json.dumps(metrics, indent=2))
    return metrics, {"module": module, "datamodule": datamodule}


def _retrofit(cfg: DictConfig, module: LanguageModelModule, state_dict: dict[str, Any],
              run_cfg: DictConfig) -> LanguageModelModule:
    """A module with `cfg.attention_override` (its settings from the `cfg.<name>` section)
    in place of the trained attention, loaded with every trained weight that fits."""
    name = cfg.attention_override
    override = {"name": name, **(resolved(cfg, name) if cfg.get(name) else {})}
    config = swap_attention(module.model_config, override)
    retrofitted = LanguageModelModule(model=config.to_dict(),
                                      optim=OmegaConf.to_container(run_cfg.optim))
    report = transfer_weights(retrofitted, state_dict)
    log.info("attention_override=%s: untrained %s; unused trained %s", name, report.missing,
             report.unexpected)
    return retrofitted
