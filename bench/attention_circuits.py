"""Which attention circuit an MQAR run learned: per layer and head, the attention mass of
the two jobs that recall needs (Olsson et al.'s induction circuit, as MQAR asks it).

    python bench/attention_circuits.py RUN_DIR [RUN_DIR ...] [--examples 256] [--json FILE]

An example is `k1 v1 ... kk vk | ... k_i ...`: keys at even positions 0..2k-2, each value
right after its key, then the queries (moa/data/mqar.py). Recall needs
- a previous-token head: at each value position 2i+1, attention on position 2i (its key),
  which copies the key into the value's residual stream (`prev`, layer 0 in a 2-layer
  model);
- a lookup head: at each query of k_i, attention on position 2i+1 (the value whose
  previous token is k_i), whose value token is the answer (`lookup`). The plateau at
  recall 1/k is attention spread over every value (`values`: the mass on all value
  positions at the queries) without the match.
`prev` and `lookup` are mean attention probabilities over the test split's examples
(chance: 1/(position+1)). Every scheme with queries and keys is read (dot-product:
softmax(q.k/sqrt(D)); metric: softmax(-alpha ||q-k||^2) in its metric space, without
the key-norm term under key_norm=ignore; ALCCA: its weights over the chosen neighbours,
`alcca_probabilities`), from the queries and keys after the position encoding, with the
run's best checkpoint. `chosen` is the fraction of value positions whose previous token
gets any weight, `found` the fraction of queries whose answer does: below 1 only where a
sparse scheme (ALCCA) leaves them out of its neighbours.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moa.attention.alcca import AlccaAttention
from moa.attention.dot_product import SelfAttention
from moa.attention.metric import MetricAttention
from moa.data import CORPORA, LMDataModule
from moa.kernels.alcca_reference import alcca_probabilities
from moa.kernels.metric_reference import metric_scores
from moa.models.language_model import build_model
from moa.training.run_files import load_run


def attention_probabilities(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor
                            ) -> torch.Tensor:
    """(B, Hq, T, T) causal attention probabilities from positioned q (B, Hq, T, D) and
    k (B, Hkv, T, D)."""
    if isinstance(module, AlccaAttention):
        c = module.alcca
        return alcca_probabilities(q, k, module.log_alpha.exp(), c.k, c.theta, c.eps,
                                   c.weighting, c.key_norm)
    if isinstance(module, MetricAttention):
        k_norm = k.pow(2).sum(-1) * (module.config.key_norm != "ignore")
        scores = metric_scores(q, k, k_norm, module.log_alpha.exp())
    else:
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    T = q.size(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def read_circuits(run_dir: Path, examples: int, checkpoint: str = "best") -> dict:
    cfg = OmegaConf.create({"run_dir": str(run_dir), "ckpt_path": None,
                            "checkpoint": checkpoint})
    run_dir, run_cfg, checkpoint = load_run(cfg)
    model = build_model(checkpoint["model_config"]).eval()
    model.load_state_dict({name.removeprefix("model."): value
                           for name, value in checkpoint["state_dict"].items()})
    data = CORPORA.parse(run_cfg.data, "data")
    datamodule = LMDataModule(data, None, seed=int(run_cfg.seed), cache_dir=run_cfg.paths.cache_dir)
    datamodule.prepare_data()
    datamodule.setup("test")
    test = datamodule.splits.datasets["test"]
    batch = [test[i] for i in range(min(examples, len(test)))]
    input_ids = torch.stack([item["input_ids"] for item in batch])  # (B, T)
    queries = torch.stack([item["scored_positions"] for item in batch])  # (B, k)
    pairs = queries.size(1)

    captured: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MetricAttention | SelfAttention):
            original = module.forward

            def forward(x, ctx, module=module, original=original, name=name):
                rotate = ctx.position.rotate

                def recording(q, k, *args):
                    q, k = rotate(q, k, *args)
                    captured[name] = (module, q.detach(), k.detach())
                    return q, k
                ctx.position.rotate = recording
                try:
                    return original(x, ctx)
                finally:
                    ctx.position.rotate = rotate
            module.forward = forward
    with torch.no_grad():
        logits = model(input_ids).logits  # (B, T, V)
    labels = torch.stack([item["labels"] for item in batch])
    scored = labels.gather(1, queries)
    recall = (logits.gather(1, queries[..., None].expand(-1, -1, logits.size(-1))).argmax(-1)
              == scored).float().mean().item()

    rows = torch.arange(len(batch))[:, None]
    value_positions = torch.arange(1, 2 * pairs, 2)  # (k,)
    # the answer of each query: the value right after the key equal to the query token
    query_tokens = input_ids.gather(1, queries)  # (B, k)
    keys = input_ids[:, 0:2 * pairs:2]  # (B, k)
    answer = 2 * (query_tokens[..., None] == keys[:, None, :]).float().argmax(-1) + 1  # (B, k)
    heads = []
    for name, (module, q, k) in captured.items():
        probs = attention_probabilities(module, q, k)  # (B, H, T, T)
        at_values = probs[:, :, value_positions, value_positions - 1]  # (B, H, k)
        chosen = (at_values > 0).float()
        at_queries = probs[rows, :, queries]  # (B, k, H, T)
        lookup = at_queries.gather(-1, answer[..., None, None].expand(-1, -1, probs.size(1), 1))
        values = at_queries[..., value_positions].sum(-1)  # (B, k, H)
        for head in range(probs.size(1)):
            heads.append({"module": name, "head": head,
                          "prev": at_values[:, head].mean().item(),
                          "chosen": chosen[:, head].mean().item(),
                          "lookup": lookup[:, :, head, 0].mean().item(),
                          "found": (lookup[:, :, head, 0] > 0).float().mean().item(),
                          "values": values[:, :, head].mean().item()})
    return {"run": str(run_dir), "attention": run_cfg.attention.name,
            "recall": recall, "heads": heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best",
                        help="last: a run still training")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    records = [read_circuits(run, args.examples, args.checkpoint) for run in args.runs]
    print(f"{'run':<28} {'recall':>6}  {'module':<34} {'head':>4} {'prev':>6} {'chosen':>6} "
          f"{'lookup':>6} {'found':>6} {'values':>6}")
    for record in records:
        for head in record["heads"]:
            print(f"{Path(record['run']).name[:28]:<28} {record['recall']:>6.3f}  "
                  f"{head['module'][:34]:<34} {head['head']:>4} {head['prev']:>6.3f} "
                  f"{head['chosen']:>6.3f} {head['lookup']:>6.3f} {head['found']:>6.3f} "
                  f"{head['values']:>6.3f}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
