"""A test-only callback, passed on the command line (`+callbacks.probe._target_=...`): each
rank writes a hash of its parameters when training ends, outside the run directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl


class ParameterHash(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.sha256").write_text(digest.hexdigest())
