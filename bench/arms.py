"""`--arm LABEL OVERRIDE...`: a model the benchmarks take beside their presets.

An arm is a label and Hydra overrides that name a preset (`model=<preset>`) and change it:
a preset with ball pruning, or with another router, measured against itself as it ships
in the same run (`bench/generate.py`, `bench/throughput.py`).
"""

from __future__ import annotations

import argparse


def add_arm_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arm", nargs="+", action="append", default=[],
                        metavar=("LABEL", "OVERRIDE"), help="also this model: a label, then "
                        "Hydra overrides with model=<preset> (repeatable)")


def arm_overrides(arms: list[list[str]], presets: list[str]) -> list[tuple[str, list[str]]]:
    """(label, Hydra overrides) of each preset (`model=<preset>`), then of each arm (LABEL
    OVERRIDE...). An arm with no `model=` override, or a label that repeats (among the
    arms or the presets), is refused before any model is built."""
    labelled = [(name, [f"model={name}"]) for name in presets]
    for label, *overrides in arms:
        if not any(override.startswith("model=") for override in overrides):
            raise SystemExit(f"--arm {label}: name its preset among the overrides "
                             "(model=<preset>)")
        labelled.append((label, overrides))
    labels = [label for label, _ in labelled]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise SystemExit("--arm: labels must differ from each other and from the presets: "
                         + ", ".join(repeated))
    return labelled
