"""python -m moa.dashboard DIR [DIR ...] [--out FILE.html | --format table]"""

from __future__ import annotations

import argparse
from pathlib import Path

from moa.dashboard.runs import load_runs
from moa.dashboard.table import build_table, format_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moa.dashboard",
        description="Compare runs: loss curves, a sortable table and router usage in one "
                    "self-contained HTML file, or the table in the terminal.")
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run directories or directories holding runs (multiruns)")
    parser.add_argument("--format", choices=["html", "table"], default="html")
    parser.add_argument("--out", type=Path, default=Path("dashboard.html"),
                        help="the HTML file to write (default: dashboard.html)")
    args = parser.parse_args(argv)
    missing = [str(directory) for directory in args.dirs if not directory.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    runs = load_runs(args.dirs)
    if not runs:
        parser.error("no run directories (with config.yaml) under "
                     + ", ".join(map(str, args.dirs)))
    if args.format == "table":
        print(format_text(*build_table(runs)))
        return
    from moa.dashboard.html import render  # plotly is only needed for the page

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(runs))
    print(f"{len(runs)} runs -> {args.out}")


if __name__ == "__main__":
    main()
