"""The run-comparison dashboard: `python -m moa.dashboard DIR [DIR ...] [--baseline KEY=VALUE]
[--format html|table|markdown|csv|json] [--out FILE]`. `runs` reads run directories,
`keys` and `groups` pool runs that differ only in seeds, `stats` gives their intervals and
verdicts, `report` the tables and files, `figures` and `html` the page."""
