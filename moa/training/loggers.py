"""What the `logger` group's YAML needs from Python: OmegaConf resolvers for wandb.

    ${wandb_mode:}            WANDB_MODE if set, else online with WANDB_API_KEY, else offline
                              (an offline run is kept under the run directory for `wandb sync`)
    ${choice_tags:${hydra:runtime.choices}}   ["attention=mha", "model=gpt", ...]: the
                              config choices of the run, as tags
    ${run_name:${task_name},${hydra:job.num},${hydra:job.override_dirname}}
                              "train-3-attention=mqa" in a sweep (job 3), "train-attention=mqa"
                              in a single run, "train" without overrides
    ${sweep_group:${hydra:job.num},${hydra:sweep.dir}}   the sweep directory in a sweep, else
                              None (a single run belongs to no group)
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


def run_name(task: str, job_num: int | None, overrides: str) -> str:
    """The run's name from its task, its job number in a sweep and its overrides; a single
    run has no job number."""
    return "-".join(str(part) for part in (task, job_num, overrides) if part not in (None, ""))


def sweep_group(job_num: int | None, sweep_dir: str) -> str | None:
    """Runs of one sweep share a group; a single run (no job number) has none."""
    return None if job_num is None else sweep_dir


def _register_resolvers() -> None:
    for name, resolver in (("wandb_mode", wandb_mode), ("choice_tags", choice_tags),
                           ("run_name", run_name), ("sweep_group", sweep_group)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


_register_resolvers()
