"""`DIR/status.json`: whether a run is running, finished or failed (and why).

Eval and the dashboard read it so that a half-written run is never taken for a finished
one. It is written atomically (a temporary file, then a rename) and only by rank 0.
`seconds` is the run's wall time (training and evaluation) up to the status: for a resumed
run, its earlier invocations' seconds plus this one's. While running, it is refreshed at
every checkpoint save (`StatusSeconds`), so a killed run keeps its seconds up to its last
checkpoint, and resuming from that checkpoint carries them on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

STATUS_FILE = "status.json"
RUNNING, FINISHED, FAILED = "running", "finished", "failed"


@rank_zero_only
def write_status(run_dir: Path, status: str, error: str | None = None,
                 seconds: float = 0.0) -> None:
    path = Path(run_dir) / STATUS_FILE
    record = {"status": status, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": round(seconds, 3)}
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path)


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The recorded status, or None for a directory that has none (an older run)."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@contextmanager
def recording_status(run_dir: Path, earlier_seconds: float = 0.0
                     ) -> Iterator[Callable[[], None]]:
    """`running` while the body runs, then `finished`, or `failed` with the error; the
    seconds are `earlier_seconds` (a resumed run's) plus the body's wall time. Yields a
    function that rewrites `running` with the seconds so far."""
    start = time.monotonic()
    write_status(run_dir, RUNNING, seconds=earlier_seconds)
    try:
        yield lambda: write_status(run_dir, RUNNING,
                                   seconds=earlier_seconds + time.monotonic() - start)
    except BaseException as error:
        write_status(run_dir, FAILED, f"{type(error).__name__}: {error}",
                     earlier_seconds + time.monotonic() - start)
        raise
    write_status(run_dir, FINISHED, seconds=earlier_seconds + time.monotonic() - start)


class StatusSeconds(pl.Callback):
    """Refreshes status.json's running seconds whenever a checkpoint is saved."""

    def __init__(self, refresh: Callable[[], None]) -> None:
        self.refresh = refresh

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.refresh()
