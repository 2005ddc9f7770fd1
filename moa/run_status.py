"""`DIR/status.json`: whether a run is running, finished or failed (and why).

Eval and the dashboard read it so that a half-written run is never taken for a finished
one. It is written atomically (a temporary file, then a rename) and only by rank 0.
`seconds` is the run's wall time (training and evaluation) up to the status: for a resumed
run, its earlier invocations' seconds plus this one's; while running, the earlier ones'.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
def recording_status(run_dir: Path, earlier_seconds: float = 0.0) -> Iterator[None]:
    """`running` while the body runs, then `finished`, or `failed` with the error; the
    seconds are `earlier_seconds` (a resumed run's) plus the body's wall time."""
    start = time.monotonic()
    write_status(run_dir, RUNNING, seconds=earlier_seconds)
    try:
        yield
    except BaseException as error:
        write_status(run_dir, FAILED, f"{type(error).__name__}: {error}",
                     earlier_seconds + time.monotonic() - start)
        raise
    write_status(run_dir, FINISHED, seconds=earlier_seconds + time.monotonic() - start)
