"""Read run directories (single runs or every job of a multirun) into `Run` records.

A run directory is one with a `config.yaml` beside `.hydra/` or `status.json` (the layout
of `moa/training/tasks.py`). From it the dashboard reads:
    config.yaml          the resolved config, flattened to dotted keys
    .hydra/hydra.yaml    the config-group choices (attention=mha, model=gpt, ...)
    .hydra/overrides.yaml  the command line's overrides (which keys a sweep set)
    status.json          running | finished | failed (moa.training.run_status) and the wall seconds;
                         without it, finished when metrics.json exists, else unknown
    metrics.json         final val/test loss, perplexity, accuracy; tables of numbers
                         (recall_by_distance) as one number an entry
    run.json             parameters (total, active) and KV-cache bytes per token
    metrics.csv          curves (x: tokens seen = (step + 1) x batch_size x block_size x
                         accumulate_grad_batches), tokens/s and each `train/stats/...` column
                         over training (router usage, pruned and TI fractions)
A file that cannot be read (not valid JSON, YAML or CSV, not the shape expected, not
readable at all) makes the run `unreadable`, its error naming the file and the reason; the
other runs are read as usual.
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
UNREADABLE = "unreadable"
STATUSES = ("running", "finished", "failed")


@dataclass
class Run:
    path: Path
    name: str
    config: dict[str, Any]  # dotted keys of config.yaml
    choices: dict[str, str]  # the config-group choices
    overrides: list[str] = field(default_factory=list)  # the command line's
    status: str = UNREADABLE
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # stats
    tokens_per_second: float | None = None
    seconds: float | None = None  # wall time of training and evaluation (status.json)
    config_read: bool = True  # False: config.yaml or .hydra/ unreadable (in no group)

    @property
    def stats(self) -> dict[str, float]:
        """The last logged value of each `train/stats/...` column."""
        return {key: points[-1][1] for key, points in self.series.items() if points}


class UnreadableFile(Exception):
    """A run file that cannot be read: the message names the file and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        name = f".hydra/{path.name}" if path.parent.name == ".hydra" else path.name
        super().__init__(f"{name}: {reason}")


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


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} where there is no such file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UnreadableFile(path, _reason(error)) from None
    if not isinstance(value, dict):
        raise UnreadableFile(path, f"not a JSON object but {type(value).__name__}")
    return value


def _yaml(path: Path, kind: type) -> Any:
    """The YAML mapping (kind dict) or list (kind list) in `path`."""
    try:
        value = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # YAML syntax, interpolations, I/O: all say why
        raise UnreadableFile(path, _reason(error)) from None
    if not isinstance(value, kind):
        raise UnreadableFile(path, f"not a YAML {kind.__name__} but {type(value).__name__}")
    return value


def _metrics(path: Path) -> dict[str, float]:
    """The numbers of metrics.json; a table of numbers (`recall_by_distance: {"1": 0.9}`)
    gives one per entry (`recall_by_distance/1`)."""
    metrics = {}
    for key, value in _json_object(path).items():
        entries = value.items() if isinstance(value, dict) else [(None, value)]
        for entry, number in entries:
            name = key if entry is None else f"{key}/{entry}"
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise UnreadableFile(path, f"{name} is {number!r}, not a number")
            metrics[name] = number
    return metrics


def _choices(run_dir: Path) -> dict[str, str]:
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = _yaml(hydra_file, dict).get("hydra", {}).get("runtime", {}).get("choices")
    if not isinstance(choices, dict):
        raise UnreadableFile(hydra_file, "no hydra.runtime.choices mapping")
    return {str(group): str(choice) for group, choice in choices.items()
            if choice is not None and not str(group).startswith("hydra")}


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(item) for item in _yaml(path, list)] if path.is_file() else []


def _status(run_dir: Path) -> tuple[str, str | None, float | None]:
    """(status, error, wall seconds); a run from before status.json kept seconds has None."""
    status_file = run_dir / "status.json"  # moa/training/run_status.py writes it
    if not status_file.is_file():
        return ("finished" if (run_dir / "metrics.json").is_file() else "unknown"), None, None
    status = _json_object(status_file)
    if status.get("status") not in STATUSES:
        raise UnreadableFile(status_file, f"status is {status.get('status')!r}, not one of "
                                          + " | ".join(STATUSES))
    seconds = status.get("seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)):
        raise UnreadableFile(status_file, f"seconds is {seconds!r}, not a number")
    return status["status"], status.get("error"), seconds


def _tokens_per_step(config: dict[str, Any]) -> int:
    return (int(config.get("data.batch_size") or 1) * int(config.get("data.block_size") or 1)
            * int(config.get("trainer.accumulate_grad_batches") or 1))


def _read_metrics_csv(run: Run) -> None:
    path = run.path / "metrics.csv"
    if not path.is_file():
        return
    try:
        per_step = _tokens_per_step(run.config)
        throughput = []
        with open(path, newline="") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                if None in row or None in row.values():
                    raise ValueError(f"line {line} has {len(row)} fields, not the header's")
                tokens = (int(row["step"]) + 1) * per_step
                for key, value in row.items():
                    if not value:
                        continue
                    if key in CURVES:
                        run.curves.setdefault(key, []).append((tokens, float(value)))
                    elif key.startswith(STATS_PREFIX):
                        run.series.setdefault(key.removeprefix(STATS_PREFIX), []).append(
                            (tokens, float(value)))
                    elif key == THROUGHPUT and math.isfinite(float(value)):
                        throughput.append(float(value))
    except KeyError as error:
        raise UnreadableFile(path, f"no {error} column") from None
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:
        raise UnreadableFile(path, _reason(error)) from None
    run.tokens_per_second = statistics.median(throughput) if throughput else None


def _name(run_dir: Path, root: Path) -> str:
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    return f"{root.name}/{name}" if name != root.name else name


def read_run(run_dir: Path, root: Path) -> Run:
    """The run in `run_dir`; an `unreadable` one, with the file and reason as its error,
    where a file cannot be read."""
    run = Run(path=run_dir, name=_name(run_dir, root), config={}, choices={},
              config_read=False)
    try:
        run.config = flatten(_yaml(run_dir / "config.yaml", dict))
        run.choices = _choices(run_dir)
        run.overrides = _overrides(run_dir)
        run.config_read = True
        run.status, run.error, run.seconds = _status(run_dir)
        run.metrics = _metrics(run_dir / "metrics.json")
        run.record = _json_object(run_dir / "run.json")
        _read_metrics_csv(run)
    except UnreadableFile as error:
        run.status, run.error = UNREADABLE, str(error)
        run.curves, run.series, run.tokens_per_second = {}, {}, None
    return run


def load_runs(roots: list[Path]) -> list[Run]:
    runs = []
    for root in roots:
        runs.extend(read_run(run_dir, root) for run_dir in find_run_dirs([root]))
    return runs
