"""The files of a run directory: writing config.yaml, tokenizer.json and run.json, and
finding what to load from a run directory or from a `python -m moa.export` directory.

Run directory layout (single run or one job of a sweep):
    config.yaml          the resolved config of the run (eval reads it)
    .hydra/              Hydra's own record of the composition and overrides
    train.log            the job's log (Hydra's file handler), Lightning's messages included
    run.json             data fingerprint (corpus and tokenizer hashes), parameter counts
                         (total, without embedding, active per token under top-k routing),
                         KV-cache bytes per token (measured on the initial model, then on
                         the trained one when training ends)
    tokenizer.json       the tokenizer the model was trained with
    checkpoints/         best.ckpt (lowest val/loss) and last.ckpt (also every few steps)
    metrics.csv          the training/validation log (CSVLogger), router statistics
                         included: train/stats/<layer path>.usage.<i> | .routed.<i> | .entropy
    metrics.json         final val_/test_ loss, ppl and acc
    status.json          running | finished | failed (with the error), wall seconds:
                         moa.training.run_status

An exported directory (moa/hf/export.py) holds model.safetensors, config.json (our model
config under `moa`) and the run's config as `EXPORTED_RUN_CONFIG`; it is read here with
safetensors and json alone, so evaluating it needs no transformers and training code
never imports the Hugging Face layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moa.config import COMPONENTS, ModelConfig
from moa.data import LMDataModule
from moa.errors import ConfigError
from moa.models.language_model import build_model, shared_parameters
from moa.models.weights_format import stale_weights, upgraded_config
from moa.training.checkpoint import check_same_model, load_checkpoint
from moa.training.run_config import resolved
from moa.training.run_status import FINISHED, read_status

EXPORTED_RUN_CONFIG = "moa_run.yaml"  # the run's config.yaml in a `moa.export` directory
EXPORTED_WEIGHTS = "model.safetensors"
WEIGHTS_PREFIX = "model."  # the Lightning module's and the exported model's weights: model.<name>


@rank_zero_only
def write_run_files(cfg: DictConfig, run_dir: Path, datamodule: LMDataModule,
                    record: dict[str, Any]) -> None:
    """config.yaml, tokenizer.json and run.json; rank 0 only (under DDP every rank runs this
    same config, and Lightning's launcher gives them the same run directory)."""
    run_config = {str(key): resolved(cfg, str(key)) for key in cfg if key != "hydra"}
    OmegaConf.save(OmegaConf.create(run_config), run_dir / "config.yaml")
    if datamodule.tokenizer is not None:
        datamodule.tokenizer.save(run_dir / "tokenizer.json")
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))


def update_run_record(run_dir: Path, updates: dict[str, Any]) -> None:
    """run.json with `updates` merged in, replaced atomically (a reader never sees half)."""
    path = run_dir / "run.json"
    record = {**json.loads(path.read_text()), **updates}
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)


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


def load_run(cfg: DictConfig) -> tuple[Path, DictConfig, dict[str, Any]]:
    """(directory, run config, checkpoint dict) of `run_dir`/`ckpt_path`: a training run
    directory, or a directory written by `python -m moa.export`."""
    exported = Path(cfg.run_dir or "") / EXPORTED_RUN_CONFIG
    if cfg.get("run_dir") and not cfg.get("ckpt_path") and exported.is_file():
        return exported.parent, OmegaConf.load(exported), load_exported(exported.parent)
    run_dir, checkpoint_path = locate_checkpoint(cfg)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    checkpoint = load_checkpoint(checkpoint_path)
    run_model = ModelConfig.from_sections(run_cfg.model, **{
        name: run_cfg[name] for name in COMPONENTS if name in run_cfg})
    check_same_model(run_model.with_vocab(checkpoint["model_config"]["vocab_size"]), checkpoint,
                     checkpoint_path)
    return run_dir, run_cfg, checkpoint


def load_exported(directory: Path) -> dict[str, Any]:
    """A checkpoint dict (`model_config`, `state_dict` with `model.` keys) of an exported
    directory. The export stores a tied weight once; loading into a freshly built model
    fills its other names, and any other missing or unknown weight is an error."""
    from safetensors.torch import load_file  # the `hf` extra, as the export that wrote it

    exported = json.loads((directory / "config.json").read_text())
    version = exported.get("moa_format_version", 1)  # exports before the field: format 1
    stale = stale_weights(exported["moa"], version)
    if stale is not None:
        raise ConfigError("run_dir", str(directory), "an exported model this moa can run", stale)
    model_config = upgraded_config(exported["moa"], version)
    weights = load_file(directory / EXPORTED_WEIGHTS)
    model = build_model(model_config)
    state = {name.removeprefix(WEIGHTS_PREFIX): value for name, value in weights.items()}
    result = model.load_state_dict(state, strict=False)
    tied = shared_parameters(model)
    untied_missing = [name for name in result.missing_keys if name not in tied]
    if untied_missing or result.unexpected_keys:
        raise ConfigError("run_dir", str(directory), "an exported moa model directory",
                          f"its weights do not fit its config (missing {untied_missing}, "
                          f"unknown {result.unexpected_keys})")
    state_dict = {WEIGHTS_PREFIX + name: value for name, value in model.state_dict().items()}
    return {"model_config": model_config, "state_dict": state_dict}

