"""Run directories written by hand for the dashboard's tests, in the layout training writes
(moa/training/run_files.py): config.yaml, .hydra/hydra.yaml (choices) and overrides.yaml,
status.json, metrics.json, run.json, metrics.csv. Small and exact: the statistics of a
group are then known in advance."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moa.training.run_status import write_status


def run_config(directory: Path, seed: int = 1, **dotted: Any) -> dict[str, Any]:
    """A resolved config as a run directory holds it: its own paths in several keys, a run
    name that carries the seed, then `dotted` keys set (`optim.lr=...`)."""
    config: dict[str, Any] = {
        "seed": seed, "resume": False, "task_name": "train",
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4},
        "attention": {"name": "dot_product", "n_kv_heads": 4},
        "data": {"name": "text_files", "seed": 1234, "batch_size": 4, "block_size": 8},
        "optim": {"lr": 3e-3},
        "trainer": {"max_steps": 4, "default_root_dir": str(directory),
                    "accumulate_grad_batches": 1},
        "callbacks": {"model_checkpoint": {"dirpath": f"{directory}/checkpoints"}},
        "logger": {"wandb": {"name": f"train-{directory.name}-seed={seed}",
                             "group": str(directory.parent), "save_dir": str(directory)}},
        "paths": {"output_dir": str(directory), "root_dir": "/somewhere"},
    }
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return config


def write_run(directory: Path, config: dict[str, Any], choices: dict[str, str] | None = None,
              metrics: dict[str, float] | None = None, status: str = "finished",
              error: str | None = None, record: dict[str, Any] | None = None,
              rows: list[dict[str, Any]] | None = None, overrides: list[str] = ()) -> Path:
    """The run directory; `metrics` None writes no metrics.json (a failed run's case)."""
    directory.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), directory / "config.yaml")
    (directory / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": {
        "attention": "mha", "model": "gpt", **(choices or {})}}}}),
        directory / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), directory / ".hydra" / "overrides.yaml")
    write_status(directory, status, error, seconds=60.0)
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "run.json").write_text(json.dumps(record or {
        "parameters": 1000, "active_parameters": 1000, "kv_cache_bytes_per_token": 512}))
    if rows:
        columns = sorted({key for row in rows for key in row})
        with open(directory / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return directory


def loss_rows(final: float, steps: int = 4) -> list[dict[str, Any]]:
    """metrics.csv rows: a falling train and val loss ending at `final`, and tokens/s."""
    rows = []
    for step in range(steps):
        loss = final + (steps - 1 - step) * 0.5
        rows.append({"epoch": 0, "step": step, "train/loss": loss + 0.1, "val/loss": loss,
                     "train|device|items_per_sec": 1000.0 + step})
    return rows


def seed_sweep(root: Path, val_losses: list[float], name: str = "sweep", start: int = 0,
               **dotted: Any) -> list[Path]:
    """One finished run per seed (seed = position + 1) under root/name/<job>, the given
    val losses, the other metrics derived from them."""
    directories = []
    for index, loss in enumerate(val_losses):
        directory = root / name / str(start + index)
        write_run(directory, run_config(directory, seed=index + 1, **dotted),
                  metrics={"val_loss": loss, "val_acc": 1.0 - loss / 4, "test_loss": loss + 0.1,
                           "test_acc": 0.9 - loss / 4},
                  rows=loss_rows(loss), overrides=[f"seed={index + 1}"])
        directories.append(directory)
    return directories


def mqar_sweep(root: Path) -> None:
    """Two schemes x two cells (data.seq_len) x two seeds of MQAR, test recall known."""
    job = 0
    for scheme, recall in (("mha", 0.99), ("mqa", 0.6)):
        for length in (64, 128):
            for seed in (1, 2):
                directory = root / "mqar" / str(job)
                config = run_config(directory, seed=seed, **{
                    "data.name": "mqar", "data.seq_len": length, "data.block_size": length,
                    "attention.n_kv_heads": 4 if scheme == "mha" else 1})
                write_run(directory, config, choices={"attention": scheme},
                          metrics={"val_loss": 1.0, "test_acc": recall - length / 1000},
                          rows=loss_rows(1.0),
                          overrides=[f"attention={scheme}", f"data.seq_len={length}",
                                     f"seed={seed}"])
                job += 1


def routed_runs(root: Path, layers: int = 2, paths: int = 3) -> None:
    """Two seeds of a routed model whose metrics.csv logs each router's usage per path,
    in the column names training writes (train/stats/layers.N.attention.router.usage.I)."""
    for seed in (1, 2):
        directory = root / "routed" / str(seed - 1)
        rows = loss_rows(1.2)
        for step, row in enumerate(rows):
            for layer in range(layers):
                for path in range(paths):
                    share = 1 / paths + (0.05 * step if path == 0 else -0.05 * step / (paths - 1))
                    row[f"train/stats/layers.{layer}.attention.router.usage.{path}"] = share
        write_run(directory, run_config(directory, seed=seed, **{"attention.name": "mixture"}),
                  choices={"model": "moas"}, metrics={"val_loss": 1.2, "test_acc": 0.6},
                  rows=rows, record={"parameters": 1500, "active_parameters": 1500,
                                     "kv_cache_bytes_per_token": 896},
                  overrides=["model=moas", f"seed={seed}"])
