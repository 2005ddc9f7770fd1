"""python -m moa.dashboard DIR [DIR ...] [--format table|markdown|csv|json|html]
[--baseline KEY=VALUE ...] [--out FILE]"""

from __future__ import annotations

import argparse
from pathlib import Path

from moa.dashboard.groups import group_runs, parse_baseline, set_baseline
from moa.dashboard.report import format_csv, format_json, format_markdown, format_table
from moa.dashboard.runs import load_runs
from moa.dashboard.table import build_table

FORMATS = ("html", "table", "markdown", "csv", "json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moa.dashboard",
        description="Compare runs. Runs whose configs differ only in seeds (and paths) are "
                    "one group: each final metric's n, mean, std and 95%% CI, and with "
                    "--baseline the difference to the baseline group (95%% Welch CI) and a "
                    "verdict. One self-contained HTML page, or the tables as text.")
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run directories or directories holding runs (multiruns)")
    parser.add_argument("--format", choices=FORMATS, default="html",
                        help="html (default): the page; table: the terminal; markdown, "
                             "csv, json: the groups' statistics for docs and papers")
    parser.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                        help="the baseline group: a config key or group choice and its value "
                             "(attention=mha); repeat to name more keys")
    parser.add_argument("--out", type=Path, default=None,
                        help="the file to write (html: default dashboard.html; the other "
                             "formats print to the terminal without it)")
    args = parser.parse_args(argv)
    missing = [str(directory) for directory in args.dirs if not directory.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    runs = load_runs(args.dirs)
    if not runs:
        parser.error("no run directories (with config.yaml) under "
                     + ", ".join(map(str, args.dirs)))
    groups = group_runs(runs)
    unreadable = [run for run in runs if not run.config_read]
    baseline = " ".join(args.baseline) or None
    try:
        if args.baseline:
            set_baseline(groups, parse_baseline(args.baseline))
    except ValueError as error:
        parser.error(str(error))

    if args.format == "html":
        from moa.dashboard.html import render  # plotly is only needed for the page

        text = render(runs, groups, baseline)
        out = args.out or Path("dashboard.html")
    else:
        text = {"table": lambda: format_table(build_table(runs), groups, unreadable, baseline),
                "markdown": lambda: format_markdown(groups, unreadable, baseline),
                "csv": lambda: format_csv(groups),
                "json": lambda: format_json(groups, unreadable, baseline)}[args.format]()
        out = args.out
    if out is None:
        print(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text if text.endswith("\n") else text + "\n")
    print(f"{len(runs)} runs in {len(groups)} groups -> {out}")


if __name__ == "__main__":
    main()
