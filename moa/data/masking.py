"""Masked language modelling's corruption (BERT, Devlin et al. 2019, section 3.1).

Each token that is not special is chosen with probability `rate` (at least one a row, so
every row has a target); a chosen token becomes `[MASK]` with probability `mask_fraction`,
a random ordinary token with probability `random_fraction`, and stays itself otherwise
(BERT's 80/10/10 by default). The labels are the original tokens at the chosen positions
and -100 elsewhere, so the loss and the accuracy are taken on chosen positions only.
Special tokens (padding, `[Q]`, `[A]`, `<|eos|>`, ...) are never chosen nor drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moa.schema import check, check_range

IGNORE_INDEX = -100  # labels that carry no loss (torch cross_entropy's default)


@dataclass
class MaskingConfig:
    rate: float = 0.15  # of the tokens that are not special
    mask_fraction: float = 0.8  # of the chosen tokens: [MASK]
    random_fraction: float = 0.1  # of the chosen tokens: a random token (the rest: unchanged)

    def __post_init__(self) -> None:
        check_range("rate", self.rate, 0.0, 1.0, low_open=True)
        check_range("mask_fraction", self.mask_fraction, 0.0, 1.0)
        check_range("random_fraction", self.random_fraction, 0.0, 1.0)
        check(self.mask_fraction + self.random_fraction <= 1.0, "random_fraction",
              self.random_fraction, f"<= {1 - self.mask_fraction:g} (1 - mask_fraction)")


def mask_tokens(ids: torch.Tensor, special_ids: torch.Tensor, mask_id: int, vocab_size: int,
                config: MaskingConfig, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted ids, labels), both (B, T) like `ids`. `special_ids` (S,): never chosen;
    random replacements are drawn uniformly from the ids in [0, vocab_size) that are not
    special. `generator` lives on the CPU, so the draws are the same on any device."""
    device = ids.device
    ordinary = ~torch.isin(ids, special_ids)  # (B, T)
    draws = torch.rand(ids.shape, generator=generator).to(device)
    chosen = ordinary & (draws < config.rate)
    # a row with ordinary tokens but none chosen gets its ordinary token of lowest draw
    first = torch.where(ordinary, draws, 2.0).argmin(dim=1, keepdim=True)  # (B, 1)
    lonely = ordinary.any(dim=1, keepdim=True) & ~chosen.any(dim=1, keepdim=True)
    chosen |= lonely & (torch.arange(ids.size(1), device=device) == first)
    labels = torch.where(chosen, ids, IGNORE_INDEX)

    kind = torch.rand(ids.shape, generator=generator).to(device)
    to_mask = chosen & (kind < config.mask_fraction)
    to_random = chosen & (kind >= config.mask_fraction) & (
        kind < config.mask_fraction + config.random_fraction)
    vocabulary = torch.arange(vocab_size, device=device)
    replacements = vocabulary[~torch.isin(vocabulary, special_ids)]  # (V',)
    picks = torch.randint(len(replacements), ids.shape, generator=generator).to(device)
    corrupted = torch.where(to_mask, mask_id, ids)
    corrupted = torch.where(to_random, replacements[picks], corrupted)
    return corrupted, labels
