"""One self-contained HTML page (plotly's script inlined once, so the page opens offline):
the groups' loss curves, their statistics against the baseline, Pareto scatters, the MQAR
heatmap, router usage over training, the sortable runs table, and the runs that were not
counted (failed, running, unreadable) with why."""

from __future__ import annotations

import html
import re
from typing import Any

import plotly.graph_objects as go

from moa.dashboard.figures import loss_figure, mqar_heatmap, pareto_figure, router_figure
from moa.dashboard.groups import Group
from moa.dashboard.report import STATISTICS_HEADER, groups_table, statistics_rows
from moa.dashboard.runs import Run
from moa.dashboard.table import build_table, format_cell

ROUTER_STAT = re.compile(r"^(?P<scope>.+\.router)\.(?P<kind>usage|routed)\.(?P<path>\d+)$")
CLASSES = {"running", "failed", "unreadable", "better", "worse"}

# Click a header to sort by it (numbers numerically, "-" last); click again to reverse.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, column) => {
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0];
    const ascending = th.dataset.order !== "ascending";
    th.dataset.order = ascending ? "ascending" : "descending";
    const key = row => row.cells[column].dataset.value;
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === "") return 1;
      if (y === "") return -1;
      const nx = Number(x), ny = Number(y);
      const order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
      return ascending ? order : -order;
    });
    rows.forEach(row => body.appendChild(row));
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; cursor: pointer; }
td:first-child, th:first-child { text-align: left; }
.running { color: #b36b00; } .failed, .unreadable { color: #c00; font-weight: bold; }
.better { color: #080; font-weight: bold; } .worse { color: #c00; font-weight: bold; }
"""


def _cell(value: Any, tag: str = "td") -> str:
    sort_key = "" if value is None else str(value)
    status = f' class="{value}"' if isinstance(value, str) and value in CLASSES else ""
    return (f'<{tag} data-value="{html.escape(sort_key)}"{status}>'
            f"{html.escape(format_cell(value))}</{tag}>")


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def router_rows(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    """One row per run and router: each path's usage (mean weight) and routed fraction
    (the share of tokens that run it), and the router's mean entropy."""
    rows = []
    for run in runs:
        routers: dict[str, dict[str, dict[int, float]]] = {}
        for key, value in run.stats.items():
            match = ROUTER_STAT.match(key)
            if match:
                paths = routers.setdefault(match["scope"], {}).setdefault(match["kind"], {})
                paths[int(match["path"])] = value
        for scope, kinds in sorted(routers.items()):
            usage, routed = kinds.get("usage", {}), kinds.get("routed", {})
            rows.append([run.name, scope.removesuffix(".router"),
                         " / ".join(f"{usage[i]:.3f}" for i in sorted(usage)),
                         " / ".join(f"{routed[i]:.3f}" for i in sorted(routed)),
                         run.stats.get(f"{scope}.entropy")])
    return ["run", "layer", "usage per path", "routed fraction per path", "entropy"], rows


def _figure(figure: go.Figure, div_id: str, with_script: bool) -> str:
    return figure.to_html(full_html=False, include_plotlyjs=with_script, div_id=div_id)


def render(runs: list[Run], groups: list[Group], baseline: str | None = None,
           title: str = "moa runs") -> str:
    figures = [(heading, div_id, figure) for heading, div_id, figure in (
        ("Loss (mean over each group's seeds, band: +-1 std)", "loss-curves",
         loss_figure(groups)),
        ("Final val loss against size and speed (error bars: 95% CI)", "pareto",
         pareto_figure(groups)),
        ("MQAR test recall", "mqar-recall", mqar_heatmap(groups)),
        ("Router usage over training (mean weight per path)", "router-usage",
         router_figure(groups))) if figure is not None]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(runs)} runs in {len(groups)} groups (runs that differ only in seeds "
             f"and paths); x axes: tokens seen = step x batch x block."
             + (f" Baseline: <b>{html.escape(baseline)}</b>." if baseline else "") + "</p>"]
    for index, (heading, div_id, figure) in enumerate(figures):
        parts += [f"<h2>{html.escape(heading)}</h2>", _figure(figure, div_id, index == 0)]
        if index == 0:
            parts += ["<h2>Groups</h2>", html_table(*groups_table(groups)),
                      "<h2>Statistics (95% CI: Student t; differences: Welch)</h2>",
                      html_table(STATISTICS_HEADER, statistics_rows(groups))]
    router_header, routers = router_rows(runs)
    if routers:
        parts += ["<h2>Router usage at the last step</h2>", html_table(router_header, routers)]
    parts += ["<h2>Runs</h2>", html_table(*build_table(runs))]
    problems = [run for run in runs if run.status in ("failed", "unreadable")]
    if problems:
        parts += ["<h2>Failed and unreadable runs</h2><ul>"]
        parts += [f"<li><b>{html.escape(run.name)}</b> ({run.status}): "
                  f"{html.escape(run.error or '?')}</li>" for run in problems]
        parts += ["</ul>"]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}"
            f"<script>{SORT_SCRIPT}</script></body></html>")
