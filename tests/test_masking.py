"""MLM masking (moa/data/masking.py): the rate, BERT's 80/10/10, never a special token."""

from __future__ import annotations

import torch

from moa.data.masking import IGNORE_INDEX, MaskingConfig, mask_tokens

VOCAB, MASK = 300, 3
SPECIAL = torch.tensor([0, 1, 2, 3])  # pad, eos, [Q], [MASK]


def batch(rows: int = 64, length: int = 200) -> torch.Tensor:
    ids = torch.randint(4, VOCAB, (rows, length))
    ids[:, ::7] = 2  # specials scattered through every row, padding at the end of some
    ids[::3, -20:] = 0
    return ids


def test_rate_and_the_80_10_10_split_are_within_tolerance():
    ids = batch()
    corrupted, labels = mask_tokens(ids, SPECIAL, MASK, VOCAB, MaskingConfig(),
                                    torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    ordinary = ~torch.isin(ids, SPECIAL)
    rate = chosen.sum() / ordinary.sum()
    assert abs(rate - 0.15) < 0.01  # ~10k ordinary tokens: std of the rate ~0.0036
    masked = (corrupted == MASK) & chosen
    kept = (corrupted == ids) & chosen
    changed = chosen & ~masked & ~kept
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.03
    assert abs(changed.sum() / n - 0.1) < 0.03
    assert abs(kept.sum() / n - 0.1) < 0.03  # a random draw equal to the token counts as kept
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # nothing else changes


def test_special_tokens_are_never_chosen_nor_drawn():
    ids = batch()
    config = MaskingConfig(rate=0.9, mask_fraction=0.0, random_fraction=1.0)
    corrupted, labels = mask_tokens(ids, SPECIAL, MASK, VOCAB, config,
                                    torch.Generator().manual_seed(1))
    special = torch.isin(ids, SPECIAL)
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(corrupted[special], ids[special])
    chosen = labels != IGNORE_INDEX
    assert not torch.isin(corrupted[chosen], SPECIAL).any()
    assert (corrupted[chosen] < VOCAB).all()


def test_every_row_with_an_ordinary_token_has_a_target_and_draws_are_seeded():
    ids = torch.full((50, 30), 2)
    ids[:, 5] = 42  # one ordinary token a row: at rate 0.01 it would mostly go unchosen
    ids[0] = 0  # a row of padding only
    first = mask_tokens(ids, SPECIAL, MASK, VOCAB, MaskingConfig(rate=0.01),
                        torch.Generator().manual_seed(3))
    labels = first[1]
    assert (labels[1:, 5] == 42).all() and (labels[0] == IGNORE_INDEX).all()
    again = mask_tokens(ids, SPECIAL, MASK, VOCAB, MaskingConfig(rate=0.01),
                        torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
