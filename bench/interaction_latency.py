"""Per-turn latency of a conversation: the Reactive Transformer against a stateless decoder.

    python bench/interaction_latency.py --json interaction_latency.json
    python bench/interaction_latency.py --size tiny --turns 8 --repeats 1

Every turn is a random `--query`-token query and an answer of exactly `--answer` greedy
tokens (no end token), batch 1, random weights, `model=rxt_alpha_micro` at `--size`.
`rxt`: one `interact` per turn: the decoder answers reading the STM (KV cache, the STM's
keys and values projected once), then the encoder and the memory attention write the
interaction into the STM; its cost does not depend on the turn. `stateless`: a decoder-only
model of the RxT decoder's shape (d_model, layers, heads, its self-attention scheme, FFN,
vocabulary; no cross-attention) that re-reads the whole history each turn: the prompt is
every earlier query and answer plus this query, prefilled, then the answer decoded with
its KV cache. `ms` is the median over `--repeats` conversations of the turn's wall time;
the table gives each implementation's turn N / turn 1 (the target for rxt: <= 1.2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from moa.config import ModelConfig
from moa.models.generation import SamplingConfig, generate
from moa.models.language_model import LanguageModel, build_model
from moa.models.reactive import ReactiveTransformer
from moa.params import model_config


def build(args: argparse.Namespace) -> tuple[ReactiveTransformer, LanguageModel]:
    config = model_config(["model=rxt_alpha_micro", f"model.size={args.size}",
                           "model.end_id=null", f"model.vocab_size={args.vocab_size}",
                           f"tokenizer.vocab_size={args.vocab_size}"])
    torch.manual_seed(0)
    rxt = build_model(config).eval()
    history = args.turns * (args.query + args.answer)
    stateless = ModelConfig.from_sections(
        {"d_model": config.d_model, "n_layers": config.n_layers, "n_heads": config.n_heads,
         "vocab_size": config.vocab_size, "max_seq_len": history},
        attention=dataclasses.asdict(config.decoder_attention),
        ffn=dataclasses.asdict(config.ffn), position=dataclasses.asdict(config.position),
        norm=dataclasses.asdict(config.norm))
    return rxt, build_model(stateless).eval()


@torch.no_grad()
def rxt_turns(model: ReactiveTransformer, queries: list[torch.Tensor], answer: int
              ) -> list[float]:
    memory = model.initial_memory(1)
    times = []
    for query in queries:
        start = time.perf_counter()
        _, memory = model.interact(query, memory, max_new_tokens=answer)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def stateless_turns(model: LanguageModel, queries: list[torch.Tensor], answer: int
                    ) -> list[float]:
    sampling = SamplingConfig(max_new_tokens=answer, temperature=0.0)
    history = torch.empty(1, 0, dtype=torch.long)
    times = []
    for query in queries:
        start = time.perf_counter()
        history = generate(model, torch.cat([history, query], dim=1), sampling)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="card", help="model.size of rxt_alpha_micro")
    parser.add_argument("--turns", type=int, default=32)
    parser.add_argument("--query", type=int, default=48, help="tokens per query")
    parser.add_argument("--answer", type=int, default=16, help="tokens per answer")
    parser.add_argument("--vocab-size", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5, help="conversations per impl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rxt, stateless = build(args)
    generator = torch.Generator().manual_seed(1)
    queries = [torch.randint(0, args.vocab_size, (1, args.query), generator=generator)
               for _ in range(args.turns)]
    runs = {"rxt": (rxt, rxt_turns), "stateless": (stateless, stateless_turns)}
    records = []
    for impl, (model, turns) in runs.items():
        turns(model, queries[:2], args.answer)  # warm-up
        per_turn = zip(*(turns(model, queries, args.answer) for _ in range(args.repeats)),
                       strict=True)
        parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        records += [{"impl": impl, "turn": turn, "ms": 1e3 * statistics.median(times),
                     "parameters": parameters}
                    for turn, times in enumerate(per_turn, start=1)]
    print(table(records, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "records": records}, indent=2))


def table(records: list[dict], args: argparse.Namespace) -> str:
    shown = sorted({1, 2, 4, 8, 16, args.turns} & set(range(1, args.turns + 1)))
    ms = {(r["impl"], r["turn"]): r["ms"] for r in records}
    impls = list(dict.fromkeys(r["impl"] for r in records))
    lines = ["| impl | params | " + " | ".join(f"turn {t} ms" for t in shown)
             + f" | turn {args.turns} / turn 1 |",
             "|---" * (len(shown) + 3) + "|"]
    for impl in impls:
        params = next(r["parameters"] for r in records if r["impl"] == impl)
        cells = " | ".join(f"{ms[impl, t]:.1f}" for t in shown)
        lines.append(f"| {impl} | {params / 1e6:.2f}M | {cells} | "
                     f"{ms[impl, args.turns] / ms[impl, 1]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
