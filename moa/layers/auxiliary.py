"""The auxiliary-loss interface: any module records named, weighted losses and stats.

The model creates one `AuxiliaryRecorder` per forward pass and hands each layer a
scoped view of it through the forward context. A module calls
`record.loss("ti_penalty", value, weight)` or `record.stat("pruned_fraction", value)`;
the Lightning module adds `weight * value` of every loss to the training objective and
logs each loss and stat under its scoped name (`layers.3.attention.ti_penalty`).
Nothing in the training loop changes when a new regulariser appears.

Stats cost ops (a router's usage and entropy per path), and Lightning writes a training
step's logs only every `trainer.log_every_n_steps` steps: the Lightning module runs the
other steps under `statistics_recorded(False)`, where recorders take no stats and modules
skip computing them (`wants_stats`). Losses are recorded either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_recording_stats = [True]  # what a new recorder's `wants_stats` starts as


@contextmanager
def statistics_recorded(enabled: bool) -> Iterator[None]:
    """Recorders made inside take stats only if `enabled`."""
    before = _recording_stats[0]
    _recording_stats[0] = enabled
    try:
        yield
    finally:
        _recording_stats[0] = before


@dataclass
class AuxiliaryRecorder:
    losses: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    prefix: str = ""
    wants_stats: bool = field(default_factory=lambda: _recording_stats[0])

    def scoped(self, name: str) -> AuxiliaryRecorder:
        """A view that writes into the same storage under `prefix.name.`."""
        return AuxiliaryRecorder(self.losses, self.stats, f"{self.prefix}{name}.",
                                 self.wants_stats)

    def loss(self, name: str, value: torch.Tensor, weight: float) -> None:
        """Record a scalar loss; the trainer optimises `weight * value`."""
        self.losses[self.prefix + name] = (value, float(weight))

    def stat(self, name: str, value: torch.Tensor | float) -> None:
        """Record a scalar statistic for logging only (never differentiated); nothing
        where stats are not wanted."""
        if not self.wants_stats:
            return
        value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
        self.stats[self.prefix + name] = value

    def total_loss(self) -> torch.Tensor | None:
        """Sum of `weight * value` over recorded losses, or None if there are none."""
        if not self.losses:
            return None
        return sum(weight * value for value, weight in self.losses.values())
