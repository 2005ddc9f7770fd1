"""The runs table: the config keys that differ between runs (`moa.dashboard.keys`: not
the runs' own paths, run names nor `resume`; seeds included), then the final numbers.
`format_text` aligns any table for the terminal."""

from __future__ import annotations

import statistics
from typing import Any

from moa.dashboard.keys import comparable_config, differing_keys
from moa.dashboard.runs import Run

SUMMARY = ["status", "val loss", "val ppl", "val acc", "tokens/s", "minutes", "parameters",
           "active parameters", "KV bytes/token"]
STAT_COLUMNS = {"TI-violating fraction": "ti_violating_fraction",
                "pruned-key fraction": "pruned_fraction"}


def _stat_mean(run: Run, stat: str) -> float | None:
    values = [value for key, value in run.stats.items() if key.endswith(f".{stat}")]
    return statistics.fmean(values) if values else None


def summary(run: Run) -> dict[str, Any]:
    """The final numbers of a run, None where it has none (yet)."""
    return {
        "status": run.status,
        "val loss": run.metrics.get("val_loss"),
        "val ppl": run.metrics.get("val_ppl"),
        "val acc": run.metrics.get("val_acc"),
        "tokens/s": run.tokens_per_second,
        "minutes": None if run.seconds is None else run.seconds / 60,
        "parameters": run.record.get("parameters"),
        "active parameters": run.record.get("active_parameters"),
        "KV bytes/token": run.record.get("kv_cache_bytes_per_token"),
    } | {column: _stat_mean(run, stat) for column, stat in STAT_COLUMNS.items()}


def build_table(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    """(header, one row per run): run name, differing keys, summary columns; the stat
    columns only when some run has them."""
    readable = [run for run in runs if run.config_read]
    keys = differing_keys([comparable_config(run) for run in readable],
                          [run.choices for run in readable])
    summaries = [summary(run) for run in runs]
    stats = [column for column in STAT_COLUMNS
             if any(values[column] is not None for values in summaries)]
    header = ["run", *keys, *SUMMARY, *stats]
    rows = []
    for run, values in zip(runs, summaries, strict=True):
        config = comparable_config(run) | run.choices
        rows.append([run.name, *(config.get(key) for key in keys),
                     *(values[column] for column in [*SUMMARY, *stats])])
    return header, rows


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def format_text(header: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned table for the terminal."""
    cells = [header, *([format_cell(value) for value in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
