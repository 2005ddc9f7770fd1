"""What the `logger` group's YAML needs from Python: OmegaConf resolvers for wandb.

    ${wandb_mode:}            WANDB_MODE if set, else online with WANDB_API_KEY, else offline
                              (an offline run is kept under the run directory for `wandb sync`)
    ${choice_tags:${hydra:runtime.choices}}   ["attention=mha", "model=gpt", ...]: the
                              config choices of the run, as tags
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from omegaconf import OmegaConf


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def choice_tags(choices: Mapping[str, str | None]) -> list[str]:
    """`group=choice` for each group the run chose, Hydra's own groups (hydra/...) left out;
    wandb allows at most 64 characters per tag."""
    return [f"{group}={choice}"[:64] for group, choice in sorted(choices.items())
            if choice is not None and not group.startswith("hydra")]


def _register_resolvers() -> None:
    for name, resolver in (("wandb_mode", wandb_mode), ("choice_tags", choice_tags)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


_register_resolvers()
