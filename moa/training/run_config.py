"""Check a whole composed run config before anything runs.

Every section is parsed into its dataclass (unknown keys, wrong types and bad values
fail with the full key), then the sections are checked against each other: the
tokenizer fits the model's vocabulary, a block fits the model's context, the trainer
section only names `lightning.pytorch.Trainer` arguments.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from moa.config import COMPONENTS, ModelConfig, OptimConfig, model_config_class
from moa.data import CORPORA, TOKENIZERS
from moa.errors import ConfigError
from moa.models.generation import SamplingConfig
from moa.schema import check_choice, parse
from moa.training.card import apply_card_config
from moa.training.freeze import check_freeze
from moa.training.objectives import OBJECTIVES
from moa.training.optim import clips_under_mixed_precision
from moa.training.values import check_sizes, check_targets, check_top_level

TOP_LEVEL_KEYS = {
    "hydra",
    "model", "attention", "ffn", "position", "norm", "optim", "data", "tokenizer", "trainer",
    "logger", "callbacks", "sampling", "paths", "task_name", "seed", "ckpt_path", "resume",
    "evaluate", "keep_host_memory", "init_from", "freeze",
    "metric", "regularizer", "router", "head", "objective",
}


@dataclass
class RunSpec:
    model: ModelConfig
    optim: OptimConfig
    data: Any
    tokenizer: Any  # None where the data brings its own vocabulary (mqar)
    sampling: SamplingConfig
    keep_host_memory: bool  # moa/training/host_memory.py
    objective: Any  # a parsed objective config (moa/training/objectives)


def check_model_size(model: DictConfig) -> None:
    """`model.size` must name one of `model.sizes` (checked before interpolation)."""
    sizes = model.get("sizes") or {}
    if sizes:
        check_choice("model.size", model.get("size"), sorted(sizes))
    check_sizes(sizes)

def resolved(cfg: DictConfig, key: str) -> Any:
    """The plain resolved value of `cfg[key]`, with interpolation errors naming the key."""
    try:
        return OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) \
            else cfg[key]
    except (InterpolationResolutionError, OmegaConfBaseException) as error:
        raise ConfigError(key, "<interpolation>", "a resolvable value", str(error).split("\n")[0]) \
            from None


def check_trainer(trainer: dict[str, Any]) -> None:
    allowed = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    for key in trainer:
        if key not in allowed and not key.startswith("_"):
            raise ConfigError(f"trainer.{key}", trainer[key], "arguments of lightning Trainer",
                              "unknown key")


def parse_run(cfg: DictConfig) -> RunSpec:
    """Parse and cross-check a composed training config; raise ConfigError on bad input.

    A `model.card_config` file is applied onto `cfg` first (moa.training.card), so the run's saved
    config holds the card's values."""
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(str(key), cfg[key], f"top-level keys {sorted(TOP_LEVEL_KEYS)}",
                              "unknown key")
    check_top_level(cfg)
    check_targets(cfg)
    check_model_size(cfg.model)
    keep_host_memory = cfg.get("keep_host_memory", True)
    check_freeze(cfg.get("freeze"))
    apply_card_config(cfg)
    model_section = resolved(cfg, "model")
    # First the model section alone: the components interpolate its values.
    parse(model_config_class(model_section), model_section, "model")
    model = ModelConfig.from_sections(
        model_section, **{key: resolved(cfg, key) for key in COMPONENTS if key in cfg})
    optim = parse(OptimConfig, resolved(cfg, "optim"), "optim")
    data = CORPORA.parse(resolved(cfg, "data"), "data")
    tokenizer = None
    if data.uses_tokenizer:
        tokenizer = TOKENIZERS.parse(resolved(cfg, "tokenizer"), "tokenizer")
        vocab = tokenizer.max_vocab_size
        if vocab is not None and model.vocab_size is not None:
            model.with_vocab(vocab)  # raises when the model's vocabulary is too small
    elif model.vocab_size is not None:
        model.with_vocab(data.vocab_size)
    if data.block_size > model.max_seq_len:
        raise ConfigError("data.block_size", data.block_size,
                          f"<= model.max_seq_len ({model.max_seq_len})",
                          "a training block longer than the model's context")
    trainer = resolved(cfg, "trainer")
    check_trainer(trainer)
    if optim.impl == "fused" and clips_under_mixed_precision(
            trainer.get("precision"), trainer.get("gradient_clip_val")):
        raise ConfigError("optim.impl", optim.impl, "auto | foreach | for_loop with "
                          f"trainer.precision={trainer.get('precision')} and "
                          "trainer.gradient_clip_val > 0", "Lightning does not clip the "
                          "gradients of a fused optimizer under mixed precision")
    sampling = parse(SamplingConfig, resolved(cfg, "sampling"), "sampling")
    objective = OBJECTIVES.parse(resolved(cfg, "objective") if "objective" in cfg
                                 else {"name": "lm"}, "objective")
    return RunSpec(model, optim, data, tokenizer, sampling, keep_host_memory, objective)
