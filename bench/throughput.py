"""Training throughput of every model preset at one common size, against `gpt`.

    python bench/throughput.py --json throughput.json
    python bench/throughput.py --presets gpt moas --d-model 256 --n-layers 4
    python bench/throughput.py --presets gpt moa_metric --variants \
        --arm ffn_topk model=moa_metric ffn.router.name=topk

Every language-model preset in `conf/model/` (found there, so new presets join by
themselves; not the Reactive Transformer's, which trains in stages; `gpt` always, as the
baseline) is composed with the same d_model, n_layers, n_heads, context and
vocabulary, through the same checks as `train.py`. One training step is what the
Lightning module does: forward, cross-entropy plus the auxiliary losses, backward, an
AdamW step over moa's parameter groups (`optim.impl=auto`, as training runs it), on
random tokens, without the model's stats (router usage, alpha), as the trainer's steps
between two written logs run (9 in 10 at trainer.log_every_n_steps=10). After `--warmup`
steps each, the presets take turns, one step each per round for `--steps` rounds, so a
slowdown of the shared machine hits them alike; a preset's step time is its median.
tokens/s is batch x block over it, GFLOP/s the FLOPs of one forward + backward (counted
once on a meta-device copy, as the training callback does; for a preset whose work
depends on the data, top-k routing, counted in its first warm-up step on its batch,
`moa.training.callbacks.batch_flops`, but not when compiled; the optimizer step is not
counted) over it, `ratio_to_gpt` its tokens/s over gpt's in the same run. `flops` (in the
records) over gpt's is the ratio of their work, so gpt's FLOPs over a preset's is the
ratio to gpt it would reach at gpt's GFLOP/s. `--arm LABEL
OVERRIDE...` (repeatable; `bench/arms.py`) adds a model that the Hydra overrides give
(`model=<preset>` among them, the common size over them), as a row named LABEL. Freed host
memory stays with the process, as in training (`keep_host_memory=true`, the default:
moa/training/host_memory.py); `--no-keep-host-memory` times glibc's default instead, which
faults a step's large blocks (the logits) in afresh each step. `--ops N` then profiles
`--warmup` more steps of each preset and arm (torch's profiler, self CPU time per step) and
lists the N ATen ops that cost it the most over gpt's same op: where its extra time goes.

After the presets, rows for the ways the trainer can run the gpt baseline (`--variants`;
`--variants-of` names other presets to run them too, each variant row then also giving
`ratio_to_gpt_variant`, its tokens/s over gpt's run the same way; an arm's label names it there):
`bf16-mixed` (forward and loss under bfloat16 autocast, as trainer.precision=bf16-mixed),
`compile` (model.compile=true), `accumulate=2` (the same batch as two half batches, as
trainer.accumulate_grad_batches=2 with half data.batch_size) and `scored=1/16` (loss on one
position in 16, as mqar's 4 queries in 64 tokens: the batch carries `scored_positions`, so
only those go through the last block's queries and the vocabulary projection; its FLOPs
are counted for that forward), `adamw=foreach` and `adamw=for_loop` (AdamW's step run that
way, as optim.impl=foreach or for_loop, instead of fused).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from arms import add_arm_argument, arm_overrides

from moa.config import ModelConfig, OptimConfig
from moa.layers.auxiliary import statistics_recorded
from moa.models.language_model import build_model
from moa.params import language_model_presets, model_config
from moa.training.callbacks import batch_flops, training_flops
from moa.training.host_memory import keep_freed
from moa.training.objectives import scored_forward, token_metrics
from moa.training.optim import build_optimizer

BASELINE = "gpt"
VARIANTS = ("bf16-mixed", "compile", "accumulate=2", "scored=1/16", "adamw=foreach",
            "adamw=for_loop")
SCORED_EVERY = 16  # the scored=1/16 variant: one labelled position per 16


def presets() -> list[str]:
    """The baseline, then every other language-model preset of conf/model/ in name order."""
    return [BASELINE] + [name for name in language_model_presets() if name != BASELINE]


def preset_config(preset: str, args: argparse.Namespace) -> ModelConfig:
    """`preset` at the common size the arguments give."""
    return sized_config([f"model={preset}"], args)


def sized_config(overrides: list[str], args: argparse.Namespace) -> ModelConfig:
    """The model that the Hydra `overrides` give, at the common size of the arguments."""
    return model_config([
        *overrides, f"model.d_model={args.d_model}", f"model.n_layers={args.n_layers}",
        f"model.n_heads={args.n_heads}", f"model.max_seq_len={args.block_size}",
        f"model.vocab_size={args.vocab_size}", f"data.block_size={args.block_size}",
    ])


class Trainee:
    """One model, its optimizer and a fixed random batch, run as `variant` says."""

    def __init__(self, config: ModelConfig, batch_size: int, block_size: int,
                 variant: str = "") -> None:
        self.config = config
        self.variant = variant
        torch.manual_seed(0)
        self.model = build_model(self.config).train()
        if variant == "compile":
            self.model.compile()
        self.autocast = variant == "bf16-mixed"
        self.micro_batches = 2 if variant == "accumulate=2" else 1
        impl = variant.removeprefix("adamw=") if variant.startswith("adamw=") else "auto"
        self.optimizer = build_optimizer(self.model, OptimConfig(warmup_steps=0, impl=impl),
                                         1)[0]
        tokens = torch.randint(0, config.vocab_size, (batch_size, block_size + 1))
        self.batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
        if variant == "scored=1/16":
            scored = torch.rand(batch_size, block_size).argsort(dim=1)
            self.batch["scored_positions"] = scored[:, : block_size // SCORED_EVERY].sort(
                dim=1).values  # (B, K): distinct positions, in order
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        chunks = {key: value.chunk(self.micro_batches) for key, value in self.batch.items()}
        for index in range(self.micro_batches):
            with (torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast),
                  statistics_recorded(False)):
                output, labels = scored_forward(
                    self.model, {key: value[index] for key, value in chunks.items()})
                loss = token_metrics(output.logits, labels)[0]
                if output.aux_loss is not None:
                    loss = loss + output.aux_loss
            (loss / self.micro_batches).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def op_times(trainee: Trainee, steps: int) -> dict[str, dict[str, float]]:
    """ATen op -> its self CPU time (ms) and calls per step, over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            trainee.step()
    return {event.key: {"ms": event.self_cpu_time_total / 1e3 / steps,
                        "calls": event.count / steps}
            for event in profiler.key_averages() if event.key.startswith("aten::")}


def print_extra_ops(records: list[dict], count: int) -> None:
    """Each preset's `count` ops with the most self time over gpt's same op."""
    baseline = records[0]["ops"]
    for record in records[1:]:
        if "ops" not in record:
            continue
        ops = record["ops"]
        absent = {"ms": 0.0, "calls": 0.0}  # an op gpt never calls
        extra = sorted(ops, key=lambda op: baseline.get(op, absent)["ms"] - ops[op]["ms"])
        total, baseline_total = (sum(op["ms"] for op in o.values()) for o in (ops, baseline))
        print(f"\n{record['preset']}: ATen self ms per step {total:.1f} (gpt "
              f"{baseline_total:.1f}); its {count} costliest over gpt's")
        print(f"{'op':<60} {'gpt ms':>8} {'calls':>6} {'ms':>8} {'calls':>6} {'extra ms':>9}")
        for op in extra[:count]:
            base = baseline.get(op, absent)
            print(f"{op[:60]:<60} {base['ms']:>8.2f} {base['calls']:>6.0f} {ops[op]['ms']:>8.2f} "
                  f"{ops[op]['calls']:>6.0f} {ops[op]['ms'] - base['ms']:>9.2f}")


def _gflops(record: dict) -> str:
    """GFLOP/s, or "-" without a FLOP count (a routed preset compiled)."""
    return "-" if record["gflops_per_s"] is None else f"{record['gflops_per_s']:.2f}"


def _same_way(record: dict) -> str:
    """tokens/s over gpt's run the same way, or "-" outside a variant of another preset."""
    ratio = record.get("ratio_to_gpt_variant")
    return "-" if ratio is None else f"{ratio:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=None, help="default: all of conf/model")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS,
                        help="rows for the gpt baseline run these ways (default: all)")
    parser.add_argument("--variants-of", nargs="*", default=[BASELINE],
                        help="the presets that get the variant rows (default: gpt)")
    add_arm_argument(parser)
    parser.add_argument("--keep-host-memory", action=argparse.BooleanOptionalAction,
                        default=True, help="freed memory stays with the process, as training "
                        "keeps it (keep_host_memory=true)")
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="also list each preset's N ATen ops costliest over gpt's")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args()
    kept = keep_freed() if args.keep_host_memory else False

    names = presets()
    if args.presets:
        names = [BASELINE] + [name for name in args.presets if name != BASELINE]
    arms = dict(arm_overrides(args.arm, names))
    size = (args.batch_size, args.block_size)
    trainees = {name: Trainee(sized_config(overrides, args), *size)
                for name, overrides in arms.items()}
    variants_of = [BASELINE] + [name for name in args.variants_of if name != BASELINE]
    trainees |= {f"{name} {variant}": Trainee(
        sized_config(arms.get(name, [f"model={name}"]), args), *size, variant)
        for name in variants_of for variant in args.variants}
    flops = {}
    for name, trainee in trainees.items():
        scored = trainee.batch.get("scored_positions")
        flops[name] = training_flops(trainee.config, size,
                                     None if scored is None else scored.size(1))
        for index in range(args.warmup):
            if index == 0 and flops[name] is None and trainee.variant != "compile":
                flops[name] = batch_flops(trainee.step)  # routed: what its batch runs
            else:
                trainee.step()
    for _ in range(args.steps):
        for trainee in trainees.values():
            trainee.times.append(trainee.step())

    tokens = args.batch_size * args.block_size
    records = []
    for name, trainee in trainees.items():
        seconds = statistics.median(trainee.times)
        records.append({
            "preset": name, "overrides": arms.get(name), "tokens_per_s": tokens / seconds,
            "flops": flops[name],
            "gflops_per_s": None if flops[name] is None else flops[name] / seconds / 1e9,
            "step_ms": 1e3 * seconds,
            "parameters": trainee.model.num_parameters(),
            "d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "block_size": args.block_size, "batch_size": args.batch_size,
            "vocab_size": args.vocab_size, "threads": torch.get_num_threads(),
            "keep_host_memory": kept,
        })
    if args.ops:
        for record, (name, trainee) in zip(records, trainees.items(), strict=True):
            if " " not in name:  # presets and arms, not the variant rows
                record["ops"] = op_times(trainee, max(args.warmup, 1))
    baseline = records[0]["tokens_per_s"]
    tokens_per_s = {record["preset"]: record["tokens_per_s"] for record in records}
    for record in records:
        record["ratio_to_gpt"] = record["tokens_per_s"] / baseline
        name, _, variant = record["preset"].partition(" ")
        if variant and name != BASELINE:
            same_way = tokens_per_s[f"{BASELINE} {variant}"]
            record["ratio_to_gpt_variant"] = record["tokens_per_s"] / same_way

    print(f"d_model={args.d_model} n_layers={args.n_layers} n_heads={args.n_heads} "
          f"block={args.block_size} batch={args.batch_size} vocab={args.vocab_size} "
          f"threads={torch.get_num_threads()} keep_host_memory={kept}; median of "
          f"{args.steps} steps")
    print(f"{'preset':<26} {'params':>10} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'ratio':>6} {'vs gpt same way':>15}")
    for r in records:
        print(f"{r['preset']:<26} {r['parameters']:>10,} {r['step_ms']:>9.1f} "
              f"{r['tokens_per_s']:>10,.0f} {_gflops(r):>8} {r['ratio_to_gpt']:>6.2f} "
              f"{_same_way(r):>15}")
    if args.ops:
        print_extra_ops(records, args.ops)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
