"""Benchmark ALCCA against dot-product SDPA and fused metric attention; retrofit losses.

    python bench/alcca.py --json bench-alcca.json                  # timings, L = 1k..16k
    python bench/alcca.py --quick                                  # L = 256, 512, one repeat
    python bench/alcca.py --run-dir DIR --json losses.json         # + retrofit losses of DIR

Timings: one attention layer's forward (projections included, batch 1, H=8, D=64, float32,
no autograd) for `sdpa` (dot-product attention), `metric_fused` (metric attention,
`cpu_fused` or `triton`) and `alcca_<index>` for each neighbour backend (k=32, theta=0, so
every query searches: the worst case and the card's n=1000 setting). Median of --repeats
after a warm-up. `peak_mb`: the peak of torch's CPU allocator over one forward, from the
profiler (as bench/attention.py); FAISS's own index memory is outside torch and not counted.
`recall`: fraction of exact neighbours that the backend returned, from the same call.
The fitted log-log slope of time against L is printed per impl (and stored as `slope`).

With --run-dir, `eval.py run_dir=DIR attention_override=alcca ...` runs for each (k, theta,
weighting) and the records carry its val loss and the unmodified model's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from moa.attention import ATTENTION
from moa.attention.alcca import search_neighbours
from moa.config import ModelConfig
from moa.kernels.neighbours import INDEXES, faiss_available
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.context import ForwardContext
from moa.layers.position import POSITION
from moa.training.memory import peak_allocated_mb

H, D, TOP_K = 8, 64, 32
ROOT = Path(__file__).resolve().parents[1]


def _attention(spec: dict, L: int) -> tuple[torch.nn.Module, ModelConfig]:
    config = ModelConfig.from_sections(
        {"d_model": H * D, "n_heads": H, "n_layers": 1, "vocab_size": 8, "max_seq_len": L},
        attention=spec, ffn={"name": "mlp"}, position={"name": "rope"}, norm={"name": "rmsnorm"})
    return ATTENTION.build(config.attention, config).eval(), config


def _impls() -> dict[str, dict]:
    impls = {"sdpa": {"name": "dot_product"},
             "metric_fused": {"name": "metric", "alpha_init": 0.05}}
    backends = ["exact"] + (["faiss_flat", "faiss_ivf", "faiss_hnsw"] if faiss_available() else [])
    for index in backends:
        impls[f"alcca_{index}"] = {"name": "alcca", "k": TOP_K, "theta": 0.0, "index": index,
                                   "alpha_init": 0.05}
    return impls


def _forward(module, config, x):
    position = POSITION.build(config.position, config.max_seq_len, config.d_model,
                              config.head_dim)
    ctx = ForwardContext(torch.arange(x.size(1)), position, AuxiliaryRecorder())
    with torch.no_grad():
        return module(x, ctx)


def _time_ms(module, config, x, repeats: int) -> float:
    _forward(module, config, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _forward(module, config, x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _recall(module, exact, config, x) -> float:
    """Share of the exact backend's neighbours that `module`'s index finds (layer 0, all
    heads), through the same search the forward uses."""
    def neighbours(attention):
        q, k, _ = attention.heads.split(x)
        position = POSITION.build(config.position, config.max_seq_len, config.d_model, D)
        q, k = position.rotate(*attention.to_metric_space(q, k), torch.arange(x.size(1)))
        c = attention.alcca
        index = INDEXES[c.index](D, c.index_options)
        positions = torch.arange(x.size(1))
        return search_neighbours(index, q.flatten(0, 1), k.flatten(0, 1), positions, 1,
                                 min(c.k, x.size(1)))

    got, want = neighbours(module), neighbours(exact)
    hits = (got[..., :, None] == want[..., None, :]).any(-1) & (got >= 0)
    return float(hits.sum() / (want >= 0).sum())


def _slope(records: list[dict], impl: str) -> float | None:
    points = [(math.log(r["L"]), math.log(r["fwd_ms"])) for r in records if r["impl"] == impl]
    if len(points) < 2:
        return None
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    return (sum((a - mx) * (b - my) for a, b in points)
            / sum((a - mx) ** 2 for a, _ in points))


def _timings(lengths: list[int], repeats: int, json_path: str | None) -> list[dict]:
    records = []
    print(f"{'impl':>17} {'L':>6} {'fwd_ms':>10} {'peak_mb':>9} {'recall':>7}", flush=True)
    for L in lengths:
        torch.manual_seed(0)
        x = torch.randn(1, L, H * D)
        exact = None
        for impl, spec in _impls().items():
            torch.manual_seed(1)  # the same projections for every impl
            module, config = _attention(spec, L)
            exact = module if impl == "alcca_exact" else exact
            fwd = _time_ms(module, config, x, repeats if L <= 4096 else 1)
            peak = peak_allocated_mb(partial(_forward, module, config, x))
            record = dict(impl=impl, L=L, H=H, D=D, fwd_ms=fwd, peak_mb=peak)
            if impl.startswith("alcca"):
                record |= dict(k=TOP_K, theta=0.0, recall=_recall(module, exact, config, x))
            records.append(record)
            print(f"{impl:>17} {L:>6} {fwd:10.1f} {record['peak_mb']:9.1f} "
                  f"{record.get('recall', float('nan')):7.3f}", flush=True)
            if json_path:  # as it goes: the long lengths take minutes
                Path(json_path).write_text(json.dumps(records, indent=2))
    for impl in _impls():
        slope = _slope(records, impl)
        for record in records:
            if record["impl"] == impl:
                record["slope"] = slope
        print(f"log-log slope of time against L, {impl}: {slope:.2f}" if slope else "", flush=True)
    return records


def _retrofit_losses(run_dir: str, grid: list[tuple[int, float, str]]) -> list[dict]:
    records = []
    for k, theta, weighting in grid:
        subprocess.run([sys.executable, "eval.py", f"run_dir={run_dir}", "attention_override=alcca",
                        f"alcca.k={k}", f"alcca.theta={theta}", f"alcca.weighting={weighting}",
                        "sampling.prompts=[]", "hydra.run.dir=/tmp/alcca-bench-eval"],
                       cwd=ROOT, check=True, capture_output=True)
        metrics = json.loads((Path(run_dir) / "metrics_alcca.json").read_text())
        records.append(dict(impl="retrofit_alcca_exact", k=k, theta=theta, weighting=weighting,
                            val_loss=metrics["val_loss"],
                            baseline_val_loss=metrics["baseline_val_loss"]))
        print(f"k={k:>5} theta={theta:<4} {weighting:>16}: val_loss {metrics['val_loss']:.4f} "
              f"(full attention {metrics['baseline_val_loss']:.4f})", flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=None,
                        help="sequence lengths to time; none given (`--lengths`): no timings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="one repeat, a small loss grid, and L = 256, 512 unless --lengths")
    parser.add_argument("--run-dir", default=None, help="a trained run to retrofit")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()
    lengths = args.lengths
    if lengths is None:
        lengths = [256, 512] if args.quick else [1024, 2048, 4096, 8192, 16384]
    records = _timings(lengths, 1 if args.quick else args.repeats, args.json) if lengths else []
    if args.run_dir:
        ks = [8, 256] if args.quick else [4, 16, 64, 100000]
        grid = [(k, theta, weighting) for k in ks for theta in (0.0, 1.0)
                for weighting in ("inverse_distance", "softmax")]
        records += _retrofit_losses(args.run_dir, grid)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
