"""One self-contained HTML page: loss curves (plotly, its script inlined so the page opens
offline), the sortable runs table, router usage per layer and path, failed runs' errors."""

from __future__ import annotations

import html
import re
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moa.dashboard.runs import Run
from moa.dashboard.table import build_table, format_cell

ROUTER_STAT = re.compile(r"^(?P<scope>.+\.router)\.(?P<kind>usage|routed)\.(?P<path>\d+)$")

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
.running { color: #b36b00; } .failed { color: #c00; font-weight: bold; }
"""


def loss_figure(runs: list[Run]) -> go.Figure:
    """Training and validation loss against tokens seen, one colour per run."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("train loss", "val loss"))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf"]
    for index, run in enumerate(runs):
        colour = palette[index % len(palette)]
        for column, key in enumerate(("train/loss", "val/loss"), start=1):
            points = run.curves.get(key, [])
            figure.add_trace(go.Scatter(
                x=[tokens for tokens, _ in points], y=[value for _, value in points],
                mode="lines+markers" if key == "val/loss" else "lines", name=run.name,
                legendgroup=run.name, showlegend=column == 1, line={"color": colour}),
                row=1, col=column)
    figure.update_xaxes(title_text="tokens seen")
    figure.update_yaxes(title_text="loss")
    figure.update_layout(height=420, margin={"t": 40, "b": 40})
    return figure


def _cell(value: Any, tag: str = "td") -> str:
    sort_key = "" if value is None else str(value)
    status = f' class="{value}"' if value in ("running", "failed") else ""
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


def render(runs: list[Run], title: str = "moa runs") -> str:
    header, rows = build_table(runs)
    figure = loss_figure(runs).to_html(full_html=False, include_plotlyjs=True)
    router_header, routers = router_rows(runs)
    failed = [run for run in runs if run.status == "failed"]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(runs)} runs; x axis: tokens seen = step x batch x block.</p>",
             figure, "<h2>Runs</h2>", html_table(header, rows)]
    if routers:
        parts += ["<h2>Router usage</h2>", html_table(router_header, routers)]
    if failed:
        parts += ["<h2>Failed runs</h2><ul>"]
        parts += [f"<li><b>{html.escape(run.name)}</b>: {html.escape(run.error or '?')}</li>"
                  for run in failed]
        parts += ["</ul>"]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}"
            f"<script>{SORT_SCRIPT}</script></body></html>")
