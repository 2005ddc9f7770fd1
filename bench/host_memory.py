"""Training step time with glibc's malloc as it is and with freed memory kept
(`keep_host_memory`, moa/training/host_memory.py), on a schemes_mqar cell.

    python bench/host_memory.py --json bench/results/host_memory.json
    python bench/host_memory.py --attention mha metric alcca --seq-len 256 --width d128

malloc's settings belong to a process, so each (attention, mode) runs in a fresh process,
the two modes one after the other, for --rounds rounds: a slowdown of the shared machine
hits both alike. A process takes --warmup steps, then times --steps, each a step of
bench/throughput.py's Trainee (forward, loss on one position in 16 as mqar's queries,
backward, AdamW) on the cell's model (`experiment=schemes_mqar`) and random tokens of its
batch. Reported per attention: the median step of each mode over all rounds, their ratio,
and the page faults per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from throughput import Trainee

from moa.params import model_config
from moa.training.host_memory import keep_freed

MODES = ("default", "keep")


def worker(mode: str, attention: str, seq_len: int, width: str, batch_size: int,
           warmup: int, steps: int) -> dict:
    """Step times (s) and page faults per step of one process."""
    if mode == "keep" and not keep_freed():
        raise SystemExit("keep_freed() needs glibc")
    config = model_config(["experiment=schemes_mqar", f"attention={attention}",
                           f"data.seq_len={seq_len}", f"mqar_width={width}"])
    trainee = Trainee(config, batch_size, seq_len, "scored=1/16")
    for _ in range(warmup):
        trainee.step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [trainee.step() for _ in range(steps)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"times": times, "faults_per_step": faults / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention", nargs="*", default=["mha", "metric", "alcca", "moas"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--width", default="d128", help="mqar_width: d64 | d128")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "ATTENTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cell = [str(args.seq_len), args.width, str(args.batch_size), str(args.warmup),
            str(args.steps)]
    if args.worker:
        mode, attention = args.worker
        print(json.dumps(worker(mode, attention, args.seq_len, args.width, args.batch_size,
                                args.warmup, args.steps)))
        return

    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for attention in args.attention:
            for mode in MODES:
                command = [sys.executable, __file__, "--worker", mode, attention,
                           "--seq-len", cell[0], "--width", cell[1], "--batch-size", cell[2],
                           "--warmup", cell[3], "--steps", cell[4]]
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                runs.setdefault((attention, mode), []).append(json.loads(out.stdout))

    records = []
    for attention in args.attention:
        record = {"attention": attention, "seq_len": args.seq_len, "width": args.width,
                  "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
                  "threads": torch.get_num_threads()}
        for mode in MODES:
            done = runs[(attention, mode)]
            record[f"{mode}_step_ms"] = 1e3 * statistics.median(
                t for run in done for t in run["times"])
            record[f"{mode}_faults_per_step"] = statistics.median(
                run["faults_per_step"] for run in done)
        record["speedup"] = record["default_step_ms"] / record["keep_step_ms"]
        records.append(record)

    print(f"schemes_mqar {args.seq_len}/{args.seq_len // 16} {args.width}, batch "
          f"{args.batch_size}, threads={torch.get_num_threads()}; median of {args.rounds} "
          f"rounds x {args.steps} steps")
    print(f"{'attention':<12} {'default ms':>11} {'keep ms':>9} {'speedup':>8} "
          f"{'faults/step':>12} {'kept':>7}")
    for r in records:
        print(f"{r['attention']:<12} {r['default_step_ms']:>11.1f} {r['keep_step_ms']:>9.1f} "
              f"{r['speedup']:>8.2f} {r['default_faults_per_step']:>12,.0f} "
              f"{r['keep_faults_per_step']:>7,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
