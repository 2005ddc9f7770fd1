"""The page's plotly figures, one colour per group throughout:
- loss curves: each group's mean over its seeds against tokens seen, a band of +-1 std;
- Pareto scatters: final val loss (95% CI as error bars) against parameters, active
  parameters, tokens/s and KV-cache bytes per token, one point per group, the front dashed;
- an MQAR heatmap: mean test recall, scheme (the `attention` choice) by cell (the other
  naming keys), for the groups whose data is mqar;
- router usage over training: each path's mean weight, per group and router.
"""

from __future__ import annotations

import re

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moa.dashboard.groups import Group, mean_curve
from moa.dashboard.runs import Run
from moa.dashboard.stats import Summary

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
ROUTER_USAGE = re.compile(r"^(?P<scope>.+\.router)\.usage\.(?P<path>\d+)$")
# x axis of each Pareto panel, and whether more of it is better (tokens/s) or worse
PARETO = (("parameters", False), ("active parameters", False), ("tokens/s", True),
          ("KV bytes/token", False))


def colour(index: int, alpha: float | None = None) -> str:
    hex_colour = PALETTE[index % len(PALETTE)]
    if alpha is None:
        return hex_colour
    red, green, blue = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def curve_runs(group: Group) -> list[Run]:
    """The counted runs, or every member while none has finished (a sweep under way)."""
    return group.counted or group.runs


def loss_figure(groups: list[Group]) -> go.Figure:
    figure = make_subplots(rows=1, cols=2, subplot_titles=("train loss", "val loss"))
    for index, group in enumerate(groups):
        for column, key in enumerate(("train/loss", "val/loss"), start=1):
            curve = mean_curve(curve_runs(group), key)
            x = [point[0] for point in curve]
            mean = [point[1] for point in curve]
            spread = [point[2] or 0.0 for point in curve]
            if any(spread):
                figure.add_trace(go.Scatter(
                    x=x + x[::-1], y=[m + s for m, s in zip(mean, spread, strict=True)]
                    + [m - s for m, s in zip(mean, spread, strict=True)][::-1],
                    fill="toself", fillcolor=colour(index, 0.2), line={"width": 0},
                    hoverinfo="skip", showlegend=False, legendgroup=group.name),
                    row=1, col=column)
            figure.add_trace(go.Scatter(
                x=x, y=mean, mode="lines+markers" if key == "val/loss" else "lines",
                name=group.name, legendgroup=group.name, showlegend=column == 1,
                line={"color": colour(index)}), row=1, col=column)
    figure.update_xaxes(title_text="tokens seen")
    figure.update_yaxes(title_text="loss")
    figure.update_layout(height=420, margin={"t": 40, "b": 40})
    return figure


def _half_width(summary: Summary) -> float:
    return 0.0 if summary.ci95 is None else summary.ci95[1] - summary.mean


def pareto_front(points: list[tuple[float, float]], more_is_better: bool
                 ) -> list[tuple[float, float]]:
    """The points no other point beats on both x and the loss (y, lower is better)."""
    front = []
    for x, y in points:
        beaten = any((ox >= x if more_is_better else ox <= x) and oy <= y
                     and (ox, oy) != (x, y) for ox, oy in points)
        if not beaten:
            front.append((x, y))
    return sorted(front)


def pareto_figure(groups: list[Group]) -> go.Figure | None:
    """None where no group has a final val loss."""
    if not any("val_loss" in group.metrics for group in groups):
        return None
    figure = make_subplots(rows=2, cols=2, subplot_titles=[column for column, _ in PARETO],
                           horizontal_spacing=0.08, vertical_spacing=0.14)
    for panel, (column, more_is_better) in enumerate(PARETO):
        row, col = divmod(panel, 2)
        points = []
        for index, group in enumerate(groups):
            loss, x = group.metrics.get("val_loss"), group.extra(column)
            if loss is None or x is None:
                continue
            points.append((x.mean, loss.mean))
            figure.add_trace(go.Scatter(
                x=[x.mean], y=[loss.mean], mode="markers", name=group.name,
                legendgroup=group.name, showlegend=panel == 0,
                marker={"color": colour(index), "size": 10},
                error_y={"type": "data", "array": [_half_width(loss)], "visible": True},
                error_x={"type": "data", "array": [_half_width(x)], "visible": True},
                hovertemplate=f"{group.name}<br>{column}: %{{x:,.4g}}<br>val loss: %{{y:.4f}}"
                              f" (n={loss.n})<extra></extra>"), row=row + 1, col=col + 1)
        front = pareto_front(points, more_is_better)
        if len(front) > 1:
            figure.add_trace(go.Scatter(
                x=[x for x, _ in front], y=[y for _, y in front], mode="lines",
                line={"color": "#999", "dash": "dash"}, name="Pareto front",
                legendgroup="front", showlegend=panel == 0, hoverinfo="skip"),
                row=row + 1, col=col + 1)
        figure.update_xaxes(title_text=column, row=row + 1, col=col + 1)
        figure.update_yaxes(title_text="final val loss", row=row + 1, col=col + 1)
    figure.update_layout(height=720, margin={"t": 40, "b": 40})
    return figure


def mqar_heatmap(groups: list[Group]) -> go.Figure | None:
    """None without MQAR groups that have a test recall."""
    cells: dict[tuple[str, str], Summary] = {}
    for group in groups:
        if group.config.get("data.name") != "mqar" or "test_acc" not in group.metrics:
            continue
        parts = dict(group.parts)
        scheme = parts.pop("attention", group.config.get("attention", "-"))
        cell = " ".join(f"{key}={value}" for key, value in parts.items()) or "-"
        cells[(str(scheme), cell)] = group.metrics["test_acc"]
    if not cells:
        return None
    schemes = sorted({scheme for scheme, _ in cells})
    columns = sorted({cell for _, cell in cells})
    z = [[cells[(s, c)].mean if (s, c) in cells else None for c in columns] for s in schemes]
    text = [[f"{cells[(s, c)].mean:.3f} (n={cells[(s, c)].n})" if (s, c) in cells else ""
             for c in columns] for s in schemes]
    figure = go.Figure(go.Heatmap(
        z=z, x=columns, y=schemes, text=text, texttemplate="%{text}", zmin=0, zmax=1,
        colorscale="Viridis", colorbar={"title": {"text": "test recall"}},
        hovertemplate="%{y} at %{x}: %{text}<extra></extra>"))
    figure.update_layout(height=max(300, 40 * len(schemes) + 160), margin={"t": 30, "b": 40},
                         xaxis_title="cell", yaxis_title="scheme")
    return figure


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def router_figure(groups: list[Group]) -> go.Figure | None:
    """Rows: the groups with routers; columns: their routers (layer scopes). None without
    routers."""
    usage: dict[str, dict[str, list[int]]] = {}  # group -> scope -> paths
    for group in groups:
        for key in {key for run in curve_runs(group) for key in run.series}:
            match = ROUTER_USAGE.match(key)
            if match:
                usage.setdefault(group.name, {}).setdefault(match["scope"], []).append(
                    int(match["path"]))
    if not usage:
        return None
    scopes = sorted({scope for routers in usage.values() for scope in routers}, key=_natural)
    named = [group for group in groups if group.name in usage]
    figure = make_subplots(
        rows=len(named), cols=len(scopes), vertical_spacing=min(0.3 / len(named), 0.12),
        subplot_titles=[f"{group.name}<br>{scope.removesuffix('.router')}"
                        for group in named for scope in scopes])
    figure.update_annotations(font_size=11)
    for row, group in enumerate(named, start=1):
        for col, scope in enumerate(scopes, start=1):
            for path in sorted(usage[group.name].get(scope, [])):
                curve = mean_curve(curve_runs(group), f"{scope}.usage.{path}", stat=True)
                figure.add_trace(go.Scatter(
                    x=[point[0] for point in curve], y=[point[1] for point in curve],
                    mode="lines", name=f"path {path}", legendgroup=f"path {path}",
                    showlegend=row == 1 and col == 1, line={"color": colour(path)}),
                    row=row, col=col)
    figure.update_xaxes(title_text="tokens seen", row=len(named))
    figure.update_yaxes(title_text="usage", col=1)
    figure.update_layout(height=280 * len(named) + 80, margin={"t": 60, "b": 40})
    return figure
