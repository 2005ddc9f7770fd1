"""The auxiliary-loss interface: any module records named, weighted losses and stats.

The model creates one `AuxiliaryRecorder` per forward pass and hands each layer a
scoped view of it through the forward context. A module calls
`record.loss("ti_penalty", value, weight)` or `record.stat("pruned_fraction", value)`;
the Lightning module adds `weight * value` of every loss to the training objective and
logs each loss and stat under its scoped name (`layers.3.attention.ti_penalty`).
Nothing in the training loop changes when a new regulariser appears.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AuxiliaryRecorder:
    losses: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    prefix: str = ""

    def scoped(self, name: str) -> AuxiliaryRecorder:
        """A view that writes into the same storage under `prefix.name.`."""
        return AuxiliaryRecorder(self.losses, self.stats, f"{self.prefix}{name}.")

    def loss(self, name: str, value: torch.Tensor, weight: float) -> None:
        """Record a scalar loss; the trainer optimises `weight * value`."""
        self.losses[self.prefix + name] = (value, float(weight))

    def stat(self, name: str, value: torch.Tensor | float) -> None:
        """Record a scalar statistic for logging only (never differentiated)."""
        value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
        self.stats[self.prefix + name] = value

    def total_loss(self) -> torch.Tensor | None:
        """Sum of `weight * value` over recorded losses, or None if there are none."""
        if not self.losses:
            return None
        return sum(weight * value for value, weight in self.losses.values())
