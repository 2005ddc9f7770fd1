"""Checkpoints written atomically: a kill during a save never leaves a broken checkpoint.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file
lives in the system temp directory, then moves it into place: across file systems that move
is a copy (a kill half-way leaves half a file), and nothing is fsynced. Here the bytes go to
a hidden temporary file beside the target, are fsynced, then `os.replace`d over it, which
is atomic on POSIX: the target is the old checkpoint or the new one, never a mix. The
temporary name (`.NAME.tmp-*`) does not end in `.ckpt`, so nothing takes it for a
checkpoint; one left behind by a kill is removed at the next save of the same name. The
checkpoint gets the permissions a plain `torch.save` would give it (the process's umask),
not the owner-only ones of the temporary file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _umask() -> int:  # pragma: no mutate block (runs at import, before any mutant is on)
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: setting it to read it is not thread-safe


def temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(temporary_prefix(path) + "*"):
            stale.unlink(missing_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=temporary_prefix(path), dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o666 & ~UMASK)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
