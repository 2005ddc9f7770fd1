"""`init_from=PATH`: start a new run from a trained model's weights.

PATH is a run directory (its checkpoints/best.ckpt, else last.ckpt), a checkpoint file or a
`python -m moa.export` directory. Only the weights are taken: the optimiser, the step, the
learning-rate schedule and the data position start afresh (unlike `ckpt_path`, which
continues a run's training state, and `resume`, which continues a run directory).

The new model must have the same architecture: every weight name and shape must match,
else the run stops before training with a ConfigError listing the differences. One
difference is allowed: a larger vocabulary (a tokenizer that adds special tokens). Then
the embedding (and an untied head's rows) grow, and each new row starts as the mean of the
old rows, so a new token begins as an "average token" rather than noise; this is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from moa.errors import ConfigError
from moa.training.checkpoint import load_checkpoint
from moa.training.run_files import EXPORTED_RUN_CONFIG, WEIGHTS_PREFIX, load_exported

log = logging.getLogger(__name__)
KEY = "init_from"


def check_init_from(cfg: DictConfig) -> None:
    """`init_from` is a path (or null), and is not combined with `resume` or `ckpt_path`."""
    init_from = cfg.get("init_from")
    if init_from is None:
        return
    if not isinstance(init_from, str) or not init_from:
        raise ConfigError(KEY, init_from, "a run directory, a checkpoint file or an exported "
                          "directory (or null)")
    for key, what in (("resume", "continues a run directory"),
                      ("ckpt_path", "continues a checkpoint's training state")):
        if cfg.get(key) not in (None, False):
            raise ConfigError(KEY, init_from, f"init_from or {key}, not both",
                              f"{key}={cfg.get(key)!r} {what}; init_from takes weights only")
    if not Path(init_from).exists():
        raise ConfigError(KEY, init_from, "a run directory, a checkpoint file or an exported "
                          "directory", "not found")


def init_state(path: Path) -> dict[str, torch.Tensor]:
    """The model weights (our names, no `model.` prefix) stored at `path`."""
    if path.is_dir() and (path / EXPORTED_RUN_CONFIG).is_file():
        checkpoint = load_exported(path)
    elif path.is_dir():
        found = [path / "checkpoints" / name for name in ("best.ckpt", "last.ckpt")
                 if (path / "checkpoints" / name).is_file()]
        if not found:
            raise ConfigError(KEY, str(path), "a run directory with checkpoints/best.ckpt or "
                              "last.ckpt, a checkpoint file or an exported directory",
                              "no checkpoint found")
        checkpoint = load_checkpoint(found[0], KEY)
    else:
        checkpoint = load_checkpoint(path, KEY)
    return {name.removeprefix(WEIGHTS_PREFIX): value
            for name, value in checkpoint["state_dict"].items()
            if name.startswith(WEIGHTS_PREFIX)}


def load_init_weights(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Copy the weights at `path` into `model`; return what was done (for run.json).

    Raises a ConfigError naming every missing, unknown or differently shaped weight."""
    source = init_state(path)
    target = model.state_dict()
    old_vocab = source["embedding.weight"].shape[0] if "embedding.weight" in source else None
    new_vocab = target["embedding.weight"].shape[0] if "embedding.weight" in target else None
    missing = sorted(target.keys() - source.keys())
    unknown = sorted(source.keys() - target.keys())
    shapes, grown = [], []
    for name in sorted(target.keys() & source.keys()):
        ours, theirs = target[name].shape, source[name].shape
        if ours == theirs:
            continue
        if _vocabulary_growth(ours, theirs, old_vocab, new_vocab):
            grown.append(name)
        else:
            shapes.append(f"{name}: {tuple(theirs)} there, {tuple(ours)} here")
    if missing or unknown or shapes:
        parts = [f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else "",
                 f"shapes differ ({'; '.join(shapes)})" if shapes else ""]
        raise ConfigError(KEY, str(path), "the weights of a model of this run's architecture",
                          "another architecture: " + ", ".join(p for p in parts if p))
    state = {}
    for name, value in source.items():
        if name in grown:
            extra = target[name].shape[0] - value.shape[0]
            mean = value.float().mean(dim=0, keepdim=True).to(value.dtype)
            value = torch.cat([value, mean.expand(extra, *value.shape[1:])])
        state[name] = value
    model.load_state_dict(state)
    if grown:
        log.info("init_from: vocabulary %d -> %d; new rows of %s set to the mean of the old "
                 "rows", old_vocab, new_vocab, ", ".join(grown))
    else:
        log.info("init_from: %d weights loaded from %s", len(state), path)
    return {"path": str(path), "vocab_grown_from": old_vocab if grown else None,
            "grown": grown}


def _vocabulary_growth(ours: torch.Size, theirs: torch.Size, old_vocab: int | None,
                       new_vocab: int | None) -> bool:
    """A weight indexed by token id in its first dimension, from the old to a larger vocab."""
    return (old_vocab is not None and new_vocab is not None and new_vocab > old_vocab
            and len(ours) == len(theirs) and ours[1:] == theirs[1:]
            and theirs[0] == old_vocab and ours[0] == new_vocab)
