"""`freeze=[glob, ...]`: parameters that training leaves exactly as they are.

Each pattern is an `fnmatch` glob over the model's parameter names (`blocks.0.*`,
`embedding.*`, `*.norm.weight`; `python -m moa.params` lists the components). A frozen
parameter gets `requires_grad=False`, so it has no gradient and the optimiser, which only
receives trainable parameters (moa/training/optim.py), never touches it: no update, no
weight decay. A tied weight is one parameter: freezing either of its names freezes both.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import torch

from moa.errors import ConfigError
from moa.schema import to_plain

log = logging.getLogger(__name__)
KEY = "freeze"


def check_freeze(patterns: Any) -> list[str]:
    """The patterns as a list of strings (null or [] -> []), or a ConfigError on `freeze`."""
    patterns = to_plain(patterns)
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list | tuple) or not all(
            isinstance(p, str) and p for p in patterns):
        raise ConfigError(KEY, patterns, "a list of globs over parameter names, e.g. "
                          "'[blocks.0.*,embedding.*]'")
    return list(patterns)


def check_patterns(model: torch.nn.Module, patterns: list[str], key: str = KEY) -> None:
    """A ConfigError on `key` naming the first pattern that matches no parameter of `model`."""
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = sorted({name.split(".")[0] for name in names})
            raise ConfigError(key, pattern, f"a glob matching parameter names (they start with "
                              f"{', '.join(shown)}; python -m moa.params lists them)",
                              "matches no parameter")


def freeze(model: torch.nn.Module, patterns: list[str]) -> dict[str, int]:
    """Freeze the parameters whose names match any pattern; return the counts.

    A pattern that matches no parameter is a ConfigError naming it (a typo would otherwise
    train what the user meant to keep)."""
    named = list(model.named_parameters(remove_duplicate=False))
    check_patterns(model, patterns)
    for name, parameter in named:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            parameter.requires_grad_(False)
    counts = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    if patterns:
        log.info("freeze %s: %s trainable, %s frozen parameters", patterns,
                 f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    return counts
