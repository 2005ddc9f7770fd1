"""Where `python -m moa.export` may write, and how.

An export never writes into a run directory (its tokenizer.json and weights would become
the run's, and `eval.py run_dir=` would evaluate them). It writes a new or empty
directory; an earlier export there (it holds `moa_run.yaml`) is replaced only with
`overwrite=true`, and any other non-empty directory is refused. The files are written
into a temporary directory beside `out` and moved into place at the end, so a failed
export leaves `out` as it was. Every file gets the permissions a new file gets under the
umask (safetensors writes its weights owner-only).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moa.errors import ConfigError
from moa.training.resume import run_records
from moa.training.run_files import EXPORTED_RUN_CONFIG


def check_destination(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse `out` where an export must not write; see the module's docstring."""
    if out.exists() and not out.is_dir():
        raise ConfigError("out", str(out), "a new or empty directory", "a file is there")
    inside = [d for d in (out.resolve(), *out.resolve().parents)
              if d == run_dir.resolve() or run_records(d)]
    if inside:
        raise ConfigError("out", str(out), "a directory outside any run directory",
                          f"{inside[0]} is a run directory: exporting into it would change "
                          "the run")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / EXPORTED_RUN_CONFIG).is_file():
        raise ConfigError("out", str(out), "a new or empty directory, or an earlier export "
                          "with overwrite=true", "it holds other files")
    if not overwrite:
        raise ConfigError("out", str(out), "a new or empty directory, or overwrite=true to "
                          "replace the earlier export there", "it holds an earlier export")


@contextmanager
def export_directory(out: Path, run_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory to write the export into; on success it becomes `out`."""
    check_destination(out, run_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        for path in staging.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        staging.chmod(0o777 & ~umask)
        if out.exists():
            shutil.rmtree(out)  # empty, or an earlier export that overwrite=true replaces
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
