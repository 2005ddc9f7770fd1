"""Cache files written under a private temporary name, then renamed into place."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside `path` to write to, renamed to `path` on success.

    Each writer gets its own name, so jobs of a sweep that build the same cache file at
    once never rename or truncate each other's half-written file; the last rename wins,
    and every finished writer wrote the same content. Nothing is left behind on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.partial{path.suffix}")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
