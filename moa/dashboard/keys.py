"""Which config keys tell runs apart.

A run's comparable config is its resolved config without what only says where or how it
ran: its own paths (the run directory in any value reads `<run dir>`, so two jobs of a
sweep agree on `trainer.default_root_dir`), `paths.*`, the loggers' run names and groups,
and `resume` (a sweep finished with `resume=auto` has it on some jobs only). Seeds (`seed`
and any `*.seed`, such as mqar's `data.seed`) are what a group of runs varies.

A group choice that differs (`attention`: mha | mqa) is one key and stands for the keys
under it, wherever they are nested (`metric` also covers `attention.metric.name`); other
differing config keys follow as dotted keys.
"""

from __future__ import annotations

from typing import Any

from moa.dashboard.runs import Run

RUN_DIR = "<run dir>"
LOGGER_RUN_NAMES = ("name", "group", "version")


def is_seed(key: str) -> bool:
    return key == "seed" or key.endswith(".seed")


def _where_or_how(key: str) -> bool:
    parts = key.split(".")
    return (key == "resume" or parts[0] == "paths"
            or (parts[0] == "logger" and parts[-1] in LOGGER_RUN_NAMES))


def comparable_config(run: Run) -> dict[str, Any]:
    """The run's config keys and group choices that say what the run is (seeds included)."""
    own = sorted({str(run.path), str(run.config.get("paths.output_dir") or run.path)},
                 key=len, reverse=True)
    config: dict[str, Any] = {}
    for key, value in run.config.items():
        if _where_or_how(key):
            continue
        if isinstance(value, str):
            for directory in own:
                value = value.replace(directory, RUN_DIR)
        config[key] = value
    return config


def _differs(values: list[Any]) -> bool:
    return len({repr(value) for value in values}) > 1


def differing_keys(configs: list[dict[str, Any]], choices: list[dict[str, str]]) -> list[str]:
    """Differing group choices, then differing dotted config keys, but not those under a
    differing choice that the choice decides (one value wherever the choice is the same:
    `attention.n_kv_heads` beside `attention`, but `data.seq_len` over a grid of data=mqar)."""
    groups = sorted({group for items in choices for group in items})
    differing = [group for group in groups if _differs([items.get(group) for items in choices])]
    keys = sorted({key for config in configs for key in config})

    def decided(key: str) -> bool:
        for group in set(key.split(".")) & set(differing):
            by_choice: dict[str | None, set[str]] = {}
            for config, items in zip(configs, choices, strict=True):
                by_choice.setdefault(items.get(group), set()).add(repr(config.get(key)))
            if all(len(values) == 1 for values in by_choice.values()):
                return True
        return False

    dotted = [key for key in keys if _differs([config.get(key) for config in configs])
              and not decided(key)]
    return differing + dotted


def override_keys(run: Run) -> set[str]:
    """The keys set on the run's command line (`.hydra/overrides.yaml`), without `+`/`~`."""
    return {override.split("=", 1)[0].lstrip("+~") for override in run.overrides}


def naming_keys(configs: list[dict[str, Any]], choices: list[dict[str, str]],
                command_line: set[str]) -> list[str]:
    """Few keys that tell every one of these apart: the differing keys in turn, those set
    on a command line first (then group choices, then dotted keys), each taken where it
    tells more apart, then each dropped again where the others suffice. A grid over
    `data.seq_len` is named by it, not also by the `data.num_kv_pairs` and
    `model.max_seq_len` that follow from it."""
    differing = differing_keys(configs, choices)
    merged = [{**config, **items} for config, items in zip(configs, choices, strict=True)]

    def distinct(keys: list[str]) -> int:
        return len({tuple(repr(values.get(key)) for key in keys) for values in merged})

    chosen: list[str] = []
    for key in sorted(differing, key=lambda key: key not in command_line):  # stable
        if distinct([*chosen, key]) > distinct(chosen):
            chosen.append(key)
    for key in reversed(chosen[:]):
        rest = [other for other in chosen if other != key]
        if distinct(rest) == distinct(chosen):
            chosen = rest
    return [key for key in differing if key in chosen]
