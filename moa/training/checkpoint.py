"""Reading checkpoints safely, and resuming a run from its own.

Every checkpoint moa reads goes through `load_checkpoint`: `torch.load(weights_only=True)`,
so a file carrying a pickled object (code that would run on load) is refused before
anything in it runs, and a missing, truncated or foreign file is one clear ConfigError.
`resume=true` continues a run from `DIR/checkpoints/last.ckpt`: the model config must be
the checkpoint's, and metrics.csv keeps the rows logged before the checkpoint's step.
"""

from __future__ import annotations

import csv
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from moa.config import ModelConfig
from moa.errors import ConfigError
from moa.models.weights_format import stale_weights, upgraded_config


def load_checkpoint(path: Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A moa checkpoint's contents, or a ConfigError naming `key` and what is wrong."""
    if not path.is_file():
        raise ConfigError(key, str(path), "an existing checkpoint file", "not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(key, str(path), "a checkpoint of tensors and plain values",
                          f"refused to load: {unsafe_content(error)}") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ConfigError(key, str(path), "a complete checkpoint file",
                          f"unreadable: {str(error).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise ConfigError(key, str(path), "a moa checkpoint", "no moa model config in it")
    version = checkpoint.get("moa_format_version")
    stale = stale_weights(checkpoint["model_config"], version)
    if stale is not None:
        raise ConfigError(key, str(path), "a moa checkpoint this version can run", stale)
    checkpoint["model_config"] = upgraded_config(checkpoint["model_config"], version)
    return checkpoint


def unsafe_content(error: pickle.UnpicklingError) -> str:
    """What made safe loading refuse a file, from PyTorch's message without its advice
    (it suggests loading with weights_only=False, the path that runs the file's code)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    thing = f"a pickled reference to {found.group(1)}" if found else "pickled objects"
    return (f"a PyTorch pickle file holding {thing}, which loading would call (code "
            "execution), not only tensors and plain values")


def check_same_model(config: ModelConfig, checkpoint: dict[str, Any], path: Path,
                     key: str = "ckpt_path") -> None:
    """Raise a ConfigError naming every model value that differs from the checkpoint's,
    instead of the size-mismatch traceback of loading its weights."""
    saved = ModelConfig.from_dict(checkpoint["model_config"]).to_dict()
    ours = config.to_dict()
    ignored = ("size", "sizes", "compile")  # names and how it runs, not the architecture
    differ = [name for name in ours if name not in ignored and ours[name] != saved[name]]
    if differ:
        shown = "; ".join(f"{name}: {ours[name]!r} here, {saved[name]!r} in the checkpoint"
                          for name in differ)
        raise ConfigError(key, str(path),
                          "the model config the checkpoint was trained with",
                          f"another model config ({shown})")


def resume_checkpoint(run_dir: Path) -> Path:
    """`run_dir/checkpoints/last.ckpt`, the checkpoint `resume=true` continues from."""
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError("resume", True, f"a run directory with {path.relative_to(run_dir)}",
                          f"no checkpoint to resume from in {run_dir}")
    return path


@rank_zero_only
def keep_metrics_before(loggers: list[Any], step: int) -> None:
    """Keep the CSV rows logged before `step` when a resumed run reopens its metrics.csv
    (Lightning's CSVLogger deletes the file when it opens), so the curve is continuous."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(row["step"]) < step]
        writer = logger.experiment  # opening it removes the old file
        with open(path, "w", newline="") as handle:
            table = csv.DictWriter(handle, fieldnames=fields)
            table.writeheader()
            table.writerows(rows)
        writer.metrics_keys = fields
