"""The run-comparison dashboard: `python -m moa.dashboard DIR [DIR ...] --out FILE.html`
(or `--format table` for the terminal). `runs` reads run directories, `table` builds the
runs table, `html` the page."""
