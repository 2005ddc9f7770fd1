"""The mutation score per module from a `make mutate` run: reads mutmut's records under
mutants/ and prints a markdown table (and writes it to --out), survivors listed by name.

Run by `make mutate` in its own venv (mutmut is no dependency of moa). A mutant whose
function no selected test executes counts against the score, as a survivor does; one not
yet checked (a run narrowed by MUTANTS, or interrupted) is left out of it; one whose test
process died of a signal counts as killed.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = ("killed", "timeout", "segfault", "crash")
MISSED = ("survived", "no tests", "suspicious")


def _status(code: int | None) -> str:
    """mutmut's status of an exit code, but a worker killed by a signal (SIGFPE in a
    kernel, SIGABRT in faiss: a negative code) is a crash, a kill, not "suspicious"."""
    return "crash" if code is not None and code < 0 and code not in status_by_exit_code \
        else status_by_exit_code[code]


def module_statuses(root: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} for every mutated file under root."""
    statuses = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = meta.relative_to(root).as_posix().removesuffix(".meta")
        statuses[module] = {name: _status(code) for name, code in codes.items()}
    return statuses


def report(statuses: dict[str, dict[str, str]]) -> str:
    lines = ["| module | mutants | checked | killed | survived | no tests | score |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    survivors = []
    for module, by_name in statuses.items():
        counts = Counter(by_name.values())
        killed = sum(counts[s] for s in KILLED)
        missed = sum(counts[s] for s in MISSED)
        checked = killed + missed
        score = f"{100 * killed / checked:.0f}%" if checked else "-"
        lines.append(f"| {module} | {len(by_name)} | {checked} | {killed} | "
                     f"{counts['survived'] + counts['suspicious']} | {counts['no tests']} | "
                     f"{score} |")
        survivors += [f"- {name} ({status})" for name, status in by_name.items()
                      if status in MISSED]
    return "\n".join([*lines, "", "Survivors (`mutmut show NAME` gives the diff):",
                      *survivors, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--names", action="store_true",
                        help="print only the names of the mutants not killed, one a line "
                             "(`mutmut run NAMES` re-checks them, e.g. after new tests)")
    args = parser.parse_args()
    statuses = module_statuses(args.mutants)
    if args.names:
        print("\n".join(name for by_name in statuses.values()
                        for name, status in by_name.items() if status in MISSED))
        return
    text = report(statuses)
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
