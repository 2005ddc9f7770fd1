"""Read run directories (single runs or every job of a multirun) into `Run` records.

A run directory is one with a `config.yaml` beside `.hydra/` or `status.json` (the layout
of `moa/training/tasks.py`). From it the dashboard reads:
    config.yaml          the resolved config, flattened to dotted keys
    .hydra/hydra.yaml    the config-group choices (attention=mha, model=gpt, ...)
    status.json          running | finished | failed (moa.training.run_status) and the wall seconds;
                         without it, finished when metrics.json exists, else unknown
    metrics.json         final val/test loss, perplexity, accuracy
    run.json             parameters (total, active) and KV-cache bytes per token
    metrics.csv          curves (x: tokens seen = (step + 1) x batch_size x block_size x
                         accumulate_grad_batches), tokens/s and the last value of each
                         `train/stats/...` column (router usage, pruned and TI fractions)
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

STATS_PREFIX = "train/stats/"
THROUGHPUT = "train|device|items_per_sec"  # tokens/s (moa.training.callbacks.TokenThroughput)
CURVES = ("train/loss", "val/loss")


@dataclass
class Run:
    path: Path
    name: str
    config: dict[str, Any]  # dotted keys of config.yaml, plus the group choices
    choices: dict[str, str]
    status: str
    error: str | None
    metrics: dict[str, float]
    record: dict[str, Any]
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # the last value of each stat
    tokens_per_second: float | None = None
    seconds: float | None = None  # wall time of training and evaluation (status.json)


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Every run directory at or under the roots, in path order."""
    found = set()
    for root in roots:
        for config in root.rglob("config.yaml"):
            directory = config.parent
            if directory.name != ".hydra" and (
                    (directory / ".hydra").is_dir() or (directory / "status.json").is_file()):
                found.add(directory)
    return sorted(found)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(item, dict | list) for item in tree):
        items = ((str(index), item) for index, item in enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _choices(run_dir: Path) -> dict[str, str]:
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = OmegaConf.load(hydra_file).hydra.runtime.choices
    return {str(group): str(choice) for group, choice in choices.items()
            if choice is not None and not str(group).startswith("hydra")}


def _status(run_dir: Path) -> tuple[str, str | None, float | None]:
    """(status, error, wall seconds); a run from before status.json kept seconds has None."""
    status_file = run_dir / "status.json"  # moa/training/run_status.py writes it
    status = json.loads(status_file.read_text()) if status_file.is_file() else None
    if status is not None:
        return status["status"], status.get("error"), status.get("seconds")
    return ("finished" if (run_dir / "metrics.json").is_file() else "unknown"), None, None


def _tokens_per_step(config: dict[str, Any]) -> int:
    return (int(config.get("data.batch_size") or 1) * int(config.get("data.block_size") or 1)
            * int(config.get("trainer.accumulate_grad_batches") or 1))


def _read_metrics_csv(run: Run) -> None:
    path = run.path / "metrics.csv"
    if not path.is_file():
        return
    per_step = _tokens_per_step(run.config)
    throughput = []
    with open(path) as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"]) + 1
            for key, value in row.items():
                if not value:
                    continue
                if key in CURVES:
                    run.curves.setdefault(key, []).append((step * per_step, float(value)))
                elif key.startswith(STATS_PREFIX):
                    run.stats[key.removeprefix(STATS_PREFIX)] = float(value)
                elif key == THROUGHPUT and math.isfinite(float(value)):
                    throughput.append(float(value))
    run.tokens_per_second = statistics.median(throughput) if throughput else None


def read_run(run_dir: Path, root: Path) -> Run:
    config = flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
    status, error, seconds = _status(run_dir)
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    run = Run(path=run_dir, name=f"{root.name}/{name}" if name != root.name else name,
              config=config, choices=_choices(run_dir), status=status, error=error,
              metrics=_json(run_dir / "metrics.json"), record=_json(run_dir / "run.json"),
              seconds=seconds)
    _read_metrics_csv(run)
    return run


def load_runs(roots: list[Path]) -> list[Run]:
    runs = []
    for root in roots:
        runs.extend(read_run(run_dir, root) for run_dir in find_run_dirs([root]))
    return runs
