"""Training step time of every attention scheme on mqar, with the last block computing the
scored positions only (`output_positions`) against the same model computing every position.

    python bench/output_positions.py --json output_positions.json
    python bench/output_positions.py --schemes mha alcca --cells 256/d128

Each cell is the `schemes_mqar` preset's (`data.seq_len` / `mqar_width`: 64 sequences a
step, 4 heads, vocabulary 8192, 2 layers, no MLP), composed through the same checks as
`train.py`; the batch is random tokens with `seq_len / 16` distinct scored positions per
sequence, as mqar has. A step is what the Lightning module does (bench/throughput.py's
`Trainee`). Both variants of a scheme are built from one seed; `full` sets the model's
`last_block_at_outputs` off, so the last block computes every position and the head keeps
the scored ones (as before 2026-11-25). After `--warmup` steps each, the two take turns,
one step each per round for `--steps` rounds; a variant's step time is its median and
`speedup` is full over selected. Freed host memory is kept, as training keeps it
(`keep_host_memory`, bench/host_memory.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from throughput import Trainee

from moa.params import CONF_DIR, model_config
from moa.training.host_memory import keep_freed

CELLS = ("64/d64", "128/d64", "256/d64", "64/d128", "128/d128", "256/d128")


def schemes() -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / "attention").glob("*.yaml"))


def cell_pair(scheme: str, cell: str, batch_size: int) -> dict[str, Trainee]:
    """The scheme at `cell` ("256/d128"): {"full": ..., "selected": ...}, one seed."""
    length, width = cell.split("/")
    config = model_config(["experiment=schemes_mqar", f"attention={scheme}",
                           f"data.seq_len={length}", f"mqar_width={width}"])
    pair = {variant: Trainee(config, batch_size, int(length), "scored=1/16")
            for variant in ("full", "selected")}
    pair["full"].model.last_block_at_outputs = False
    return pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemes", nargs="*", default=None, help="default: conf/attention")
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=CELLS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()

    keep_freed()
    records = []
    print(f"threads={torch.get_num_threads()} batch={args.batch_size}; "
          f"median of {args.steps} steps")
    print(f"{'cell':<9} {'scheme':<12} {'full ms':>9} {'selected ms':>12} {'speedup':>8}")
    for cell in args.cells:
        for scheme in args.schemes or schemes():
            pair = cell_pair(scheme, cell, args.batch_size)
            for trainee in pair.values():
                for _ in range(args.warmup):
                    trainee.step()
            for _ in range(args.steps):
                for trainee in pair.values():
                    trainee.times.append(trainee.step())
            full, selected = (statistics.median(pair[v].times) for v in ("full", "selected"))
            records.append({"cell": cell, "scheme": scheme, "full_ms": 1e3 * full,
                            "selected_ms": 1e3 * selected, "speedup": full / selected,
                            "batch_size": args.batch_size, "threads": torch.get_num_threads()})
            print(f"{cell:<9} {scheme:<12} {1e3 * full:>9.1f} {1e3 * selected:>12.1f} "
                  f"{full / selected:>8.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
