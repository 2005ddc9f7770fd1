"""Runs grouped by what they are: runs whose comparable configs differ only in seeds are
one group (`moa.dashboard.keys`). A group counts its finished runs; a failed, running or
unreadable member is reported with its status and error and not counted. Each final
metric becomes a `Summary` (n, mean, std, 95% CI), and with a baseline a `Difference`
(Welch 95% CI and verdict).

Baseline `KEY=VALUE ...`: the group(s) whose config or group choice has each KEY at
VALUE. Where one group matches, every other group is compared with it. Where several do
(`attention=mha` in a sweep over schemes and lengths), each group is compared with the
matching group that agrees with it on every other naming key (MHA at the same length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moa.dashboard.keys import comparable_config, is_seed, naming_keys, override_keys
from moa.dashboard.runs import Run
from moa.dashboard.stats import Difference, Summary, compare, summarize

FINISHED = "finished"
METRIC_ORDER = ("val_loss", "val_ppl", "val_acc", "test_loss", "test_ppl", "test_acc")
RECORD_KEYS = {"parameters": "parameters", "active parameters": "active_parameters",
               "KV bytes/token": "kv_cache_bytes_per_token"}


@dataclass
class Group:
    config: dict[str, Any]  # the comparable config without seeds, and the group choices
    runs: list[Run]
    parts: list[tuple[str, str]] = field(default_factory=list)  # the naming KEY=VALUEs
    baseline: Group | None = None
    metrics: dict[str, Summary] = field(default_factory=dict)
    differences: dict[str, Difference] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.parts) or "all runs"

    @property
    def counted(self) -> list[Run]:
        return [run for run in self.runs if run.status == FINISHED and run.metrics]

    @property
    def not_counted(self) -> list[Run]:
        return [run for run in self.runs if run not in self.counted]

    def summary_of(self, values: list[Any]) -> Summary | None:
        """The summary of the counted runs' finite values."""
        return summarize([float(value) for value in values
                          if isinstance(value, int | float) and math.isfinite(value)])

    def extra(self, column: str) -> Summary | None:
        """Sizes (run.json), tokens/s and minutes over the counted runs."""
        if column in RECORD_KEYS:
            return self.summary_of([run.record.get(RECORD_KEYS[column]) for run in self.counted])
        if column == "tokens/s":
            return self.summary_of([run.tokens_per_second for run in self.counted])
        if column == "minutes":
            return self.summary_of([None if run.seconds is None else run.seconds / 60
                                    for run in self.counted])
        raise KeyError(column)


def _signature(run: Run) -> dict[str, Any]:
    config = {key: value for key, value in comparable_config(run).items() if not is_seed(key)}
    return config | run.choices


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in the order of their first run; runs whose config.yaml is unreadable join
    none (the caller lists them)."""
    groups: dict[str, Group] = {}
    for run in runs:
        if run.config_read:
            config = _signature(run)
            groups.setdefault(repr(sorted(config.items())), Group(config, [])).runs.append(run)
    found = list(groups.values())
    if len(found) > 1:
        configs = [{k: v for k, v in g.config.items() if k not in g.runs[0].choices}
                   for g in found]
        choices = [g.runs[0].choices for g in found]
        command_line = set().union(*(override_keys(run) for g in found for run in g.runs))
        keys = naming_keys(configs, choices, command_line)
        for group in found:  # a key a group's config has not is left out of its name...
            group.parts = [(key, _text(group.config[key])) for key in keys
                           if group.config.get(key) is not None]
        names = [group.name for group in found]
        if len(set(names)) < len(names) or not all(group.parts for group in found):
            for group in found:  # ...unless that leaves two groups the same name
                group.parts = [(key, _text(group.config.get(key))) for key in keys]
    for group in found:
        _summarize(group)
    return found


def _text(value: Any) -> str:
    """A value as a command line writes it (null, true, 3e-3 as given)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def metric_names(groups: list[Group]) -> list[str]:
    names = {key for group in groups for run in group.counted for key in run.metrics}
    return [*(name for name in METRIC_ORDER if name in names),
            *sorted(names - set(METRIC_ORDER))]


def _summarize(group: Group) -> None:
    for metric in metric_names([group]):
        summary = group.summary_of([run.metrics.get(metric) for run in group.counted])
        if summary is not None:
            group.metrics[metric] = summary


def parse_baseline(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` items -> {KEY: VALUE}; ValueError names a malformed item."""
    parsed = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"--baseline {item!r}: expected KEY=VALUE")
        parsed[key.strip()] = value.strip()
    return parsed


def _matches(value: Any, wanted: str) -> bool:
    if _text(value) == wanted:
        return True
    try:
        return isinstance(value, int | float) and float(wanted) == value
    except ValueError:
        return False


def set_baseline(groups: list[Group], baseline: dict[str, str]) -> list[Group]:
    """Give each group its baseline group and differences; returns the baseline groups.
    ValueError, naming the keys that tell groups apart, where no group matches."""
    for key in baseline:
        if is_seed(key):
            raise ValueError(f"--baseline {key}: seeds are what a group varies, not a baseline")
    matching = [group for group in groups
                if all(key in group.config and _matches(group.config[key], value)
                       for key, value in baseline.items())]
    if not matching:
        wanted = " ".join(f"{key}={value}" for key, value in baseline.items())
        names = "; ".join(group.name for group in groups)
        raise ValueError(f"--baseline {wanted}: no group has it (groups: {names})")
    for group in groups:
        if len(matching) == 1:
            group.baseline = matching[0]
        else:
            rest = [(key, value) for key, value in group.parts if key not in baseline]
            same = [candidate for candidate in matching
                    if [(k, v) for k, v in candidate.parts if k not in baseline] == rest]
            group.baseline = same[0] if len(same) == 1 else None
        if group.baseline is None or group.baseline is group:
            continue
        for metric, summary in group.metrics.items():
            reference = group.baseline.metrics.get(metric)
            if reference is not None:
                group.differences[metric] = compare(summary, reference, metric)
    return matching


def mean_curve(runs: list[Run], key: str, stat: bool = False
               ) -> list[tuple[float, float, float | None]]:
    """(tokens seen, mean, std or None) of a curve (`stat`: a train/stats series) over the
    runs, at every x any of them logged."""
    points: dict[float, list[float]] = {}
    for run in runs:
        for x, y in (run.series if stat else run.curves).get(key, []):
            if math.isfinite(y):
                points.setdefault(x, []).append(y)
    curve = []
    for x in sorted(points):
        summary = summarize(points[x])
        if summary is not None:
            curve.append((x, summary.mean, summary.std))
    return curve
