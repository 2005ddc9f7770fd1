"""What `resume` makes of a run directory.

- `false`: start afresh, in a directory that holds no other run (its checkpoints,
  metrics or status): a run directory is one run's record, so a new run there is refused;
- `true`: continue its `checkpoints/last.ckpt` (an error without one);
- `auto`, for a sweep carried over several sittings: whichever applies. A finished run is
  left as it is (its metrics.json is the job's result), a run with a checkpoint continues
  (killed, or failed: a failed job is tried again), and a run without one starts.

Before `auto` touches a directory it checks that the run there is this job's: every value
that both this job's config and the directory's config.yaml hold must be equal (values
that only one holds, such as keys added since, are not compared). A sweep launched again
with other values, whose job numbers then name other runs, is refused, not mixed in.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moa.errors import ConfigError
from moa.training.run_config import resolved
from moa.training.run_status import FINISHED, STATUS_FILE, read_status

# The sections that decide what a run computes (not where it logs or how it is watched).
COMPARED = ("seed", "model", "attention", "ffn", "position", "norm", "head", "router",
            "metric", "regularizer", "optim", "data", "tokenizer", "trainer")


# What makes a directory a run's record (Hydra's own .hydra/ and job log do not).
RUN_RECORDS = ("checkpoints", "metrics.json", "metrics.csv", STATUS_FILE)


def run_records(run_dir: Path) -> list[str]:
    """The files (or a non-empty checkpoints/) in `run_dir` that belong to a run."""
    found = []
    for name in RUN_RECORDS:
        path = run_dir / name
        if path.is_dir() and any(path.iterdir()) or path.is_file():
            found.append(f"{name}/" if path.is_dir() else name)
    return found


def check_free(run_dir: Path) -> None:
    """Refuse a new run in a directory holding another run's records."""
    found = run_records(run_dir)
    if found:
        raise ConfigError("hydra.run.dir", str(run_dir), "a new or empty run directory",
                          f"it holds another run ({', '.join(found)}): continue that run "
                          "with resume=true, or give a new hydra.run.dir")


class Resume(enum.Enum):
    FRESH = "fresh"  # train from the start (or from ckpt_path)
    CONTINUE = "continue"  # continue the directory's checkpoints/last.ckpt
    FINISHED = "finished"  # the directory's run is done: nothing to train


def resume_mode(cfg: DictConfig, run_dir: Path) -> Resume:
    resume = cfg.get("resume", False)
    if resume is True:
        return Resume.CONTINUE
    if resume is False or resume is None:
        if rank_zero_only.rank == 0:  # the other ranks of a DDP run join rank 0's directory
            check_free(run_dir)
        return Resume.FRESH
    if resume != "auto":
        raise ConfigError("resume", resume, "false | true | auto")
    differ = differences_from_saved(cfg, run_dir)
    if differ:
        shown = "; ".join(f"{key}: {ours!r} here, {saved!r} there"
                          for key, ours, saved in differ[:5])
        raise ConfigError("resume", "auto", "a run directory holding this job's run",
                          f"{run_dir} holds another run ({shown})")
    if (read_status(run_dir) or {}).get("status") == FINISHED:
        return Resume.FINISHED
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return Resume.CONTINUE
    return Resume.FRESH


def differences_from_saved(cfg: DictConfig, run_dir: Path) -> list[tuple[str, Any, Any]]:
    """(dotted key, this job's value, the saved value) where the two configs disagree."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    saved = OmegaConf.to_container(OmegaConf.load(path))
    ours = {key: resolved(cfg, key) for key in COMPARED if key in cfg}
    return _differences(ours, {key: saved[key] for key in COMPARED if key in saved}, "")


def _differences(ours: dict[str, Any], saved: dict[str, Any],
                 prefix: str) -> list[tuple[str, Any, Any]]:
    found = []
    for key in ours.keys() & saved.keys():
        a, b = ours[key], saved[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return sorted(found)
