"""The groups as tables and files: the terminal (`table`), Markdown for docs, CSV and JSON.

Two tables: the groups (counted and not-counted runs, sizes, tokens/s, minutes: means over
the counted runs) and the statistics (one row per group and final metric: n, mean, std,
95% CI, and with a baseline the difference, its 95% Welch CI and the verdict). The JSON:
    {"baseline": "attention=mha" | null,
     "groups": [{"name": "attention=mqa", "runs": [DIR, ...],
                 "metrics": {"val_loss": {"n", "mean", "std", "ci95": [lo, hi]}, ...},
                 "vs_baseline": {"val_loss": {"delta", "delta_ci95": [lo, hi],
                                              "verdict": "better" | "worse" |
                                                         "not distinguishable"}, ...} | null,
                 "baseline_group": NAME | null,
                 "not_counted": [{"run": DIR, "status": ..., "error": ...}, ...]}, ...],
     "unreadable": [{"run": DIR, "error": "FILE: reason"}, ...]}
"runs" are the counted runs; std and CI are null below two runs, a difference's CI too.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from moa.dashboard.groups import Group, metric_names
from moa.dashboard.runs import Run
from moa.dashboard.stats import Summary
from moa.dashboard.table import format_cell, format_text

TABLE_METRICS = ("val_loss", "val_acc", "test_loss", "test_acc")  # ppl = exp(loss)
EXTRA_COLUMNS = ("parameters", "active parameters", "KV bytes/token", "tokens/s", "minutes")
STATISTICS_HEADER = ["group", "metric", "n", "mean", "std", "95% CI", "vs baseline",
                     "95% CI of the difference", "verdict"]


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(interval: tuple[float, float] | None, signed: bool = False) -> str:
    if interval is None:
        return "-"
    sign = "+" if signed else ""
    return f"[{interval[0]:{sign}.4f}, {interval[1]:{sign}.4f}]"


def _runs_cell(group: Group) -> str:
    missing = group.not_counted
    if not missing:
        return str(len(group.counted))
    statuses = sorted({run.status for run in missing})
    return f"{len(group.counted)} (+{len(missing)} {'/'.join(statuses)}, not counted)"


def _extra_cell(summary: Summary | None) -> Any:
    if summary is None:
        return None
    return round(summary.mean) if summary.std in (None, 0.0) and summary.mean.is_integer() \
        else summary.mean


def groups_table(groups: list[Group]) -> tuple[list[str], list[list[Any]]]:
    header = ["group", "runs", *EXTRA_COLUMNS]
    rows = [[group.name, _runs_cell(group), *(_extra_cell(group.extra(column))
                                                for column in EXTRA_COLUMNS)]
            for group in groups]
    return header, rows


def statistics_rows(groups: list[Group], metrics: tuple[str, ...] | list[str] = TABLE_METRICS
                    ) -> list[list[str]]:
    rows = []
    for group in groups:
        for metric in metrics:
            summary = group.metrics.get(metric)
            if summary is None:
                continue
            difference = group.differences.get(metric)
            if group.baseline is group:
                versus = ["(baseline)", "-", "-"]
            elif difference is None:
                versus = ["-", "-", "-"]
            else:
                versus = [f"{difference.delta:+.4f}", _interval(difference.delta_ci95, True),
                          difference.verdict]
            rows.append([group.name, metric, str(summary.n), _number(summary.mean),
                         _number(summary.std), _interval(summary.ci95), *versus])
    return rows


def _why(run: Run) -> str:
    """What follows a not-counted run's status: its error, or for a finished run that it
    has no final metrics."""
    if run.error:
        return f": {run.error}"
    return ": no final metrics (metrics.json)" if run.status == "finished" else ""


def _problems(groups: list[Group], unreadable: list[Run]) -> list[str]:
    lines = [f"not counted: {run.name} ({group.name}): {run.status}{_why(run)}"
             for group in groups for run in group.not_counted]
    return lines + [f"unreadable: {run.name}: {run.error}" for run in unreadable]


def _baseline_line(baseline: str | None) -> str:
    return (f"Differences are group minus baseline ({baseline}) with 95% Welch intervals; "
            "lower is better for losses and perplexities, higher for accuracies."
            if baseline else "")


def format_table(runs_table: tuple[list[str], list[list[Any]]], groups: list[Group],
                 unreadable: list[Run], baseline: str | None) -> str:
    """The terminal: the runs, the groups, the statistics, what was not counted."""
    parts = ["Runs", format_text(*runs_table)]
    if groups:
        parts += ["", "Groups (seeds pooled)", format_text(*groups_table(groups)), "",
                  "Statistics (mean, sample std, 95% Student-t interval of the mean)",
                  format_text(STATISTICS_HEADER, statistics_rows(groups))]
    line = _baseline_line(baseline)
    problems = _problems(groups, unreadable)
    return "\n".join(parts + ([line] if line else []) + ([""] + problems if problems else []))


def _markdown(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return (value if isinstance(value, str) else format_cell(value)).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def format_markdown(groups: list[Group], unreadable: list[Run], baseline: str | None) -> str:
    header, rows = groups_table(groups)
    parts = [_markdown(header, rows), "", _markdown(STATISTICS_HEADER, statistics_rows(groups))]
    line = _baseline_line(baseline)
    if line:
        parts += ["", line]
    problems = _problems(groups, unreadable)
    if problems:
        parts += ["", *(f"- {problem}" for problem in problems)]
    return "\n".join(parts)


CSV_HEADER = ["group", "metric", "n", "mean", "std", "ci95_low", "ci95_high", "baseline",
              "delta", "delta_ci95_low", "delta_ci95_high", "verdict", "runs", "not_counted"]


def format_csv(groups: list[Group]) -> str:
    """One row per group and final metric, numbers in full precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for group in groups:
        for metric in metric_names([group]):
            summary = group.metrics.get(metric)
            if summary is None:
                continue
            difference = group.differences.get(metric)
            delta_ci = difference.delta_ci95 if difference else None
            writer.writerow([
                group.name, metric, summary.n, summary.mean, summary.std,
                *(summary.ci95 or (None, None)),
                group.baseline.name if group.baseline else None,
                difference.delta if difference else None, *(delta_ci or (None, None)),
                difference.verdict if difference else None,
                " ".join(str(run.path) for run in group.counted),
                " ".join(str(run.path) for run in group.not_counted)])
    return out.getvalue()


def _summary_json(summary: Summary) -> dict[str, Any]:
    return {"n": summary.n, "mean": summary.mean, "std": summary.std,
            "ci95": list(summary.ci95) if summary.ci95 else None}


def as_json(groups: list[Group], unreadable: list[Run], baseline: str | None
            ) -> dict[str, Any]:
    return {"baseline": baseline, "groups": [{
        "name": group.name,
        "runs": [str(run.path) for run in group.counted],
        "metrics": {metric: _summary_json(summary) for metric, summary in group.metrics.items()},
        "vs_baseline": {metric: {"delta": difference.delta,
                                 "delta_ci95": list(difference.delta_ci95)
                                 if difference.delta_ci95 else None,
                                 "verdict": difference.verdict}
                        for metric, difference in group.differences.items()}
        if group.baseline is not None and group.baseline is not group else None,
        "baseline_group": group.baseline.name if group.baseline else None,
        "not_counted": [{"run": str(run.path), "status": run.status, "error": run.error}
                        for run in group.not_counted],
    } for group in groups], "unreadable": [{"run": str(run.path), "error": run.error}
                                           for run in unreadable]}


def format_json(groups: list[Group], unreadable: list[Run], baseline: str | None) -> str:
    return json.dumps(as_json(groups, unreadable, baseline), indent=2)
