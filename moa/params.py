"""Parameter counts per component of a model preset, and its KV cache per token.

    python -m moa.params model=discoverlm model.size=card
    python -m moa.params model=gpt attention=gqa position=blackhole_rope

Composes `conf/train.yaml` with the overrides, checks it as `train.py` would, builds the
model on the meta device and prints one row per top-level component (the model's own
child modules, in order; a list of blocks also gets one sub-row per block part, summed
over the blocks), the KV cache's bytes per token (measured on a freshly initialised
model, batch 1, by a short cached generation of random tokens: with ball pruning it
follows the fraction of keys the balls keep), then `Total  <millions>M`. A weight shared
by two components (tied embeddings) counts once, in the first: the LM head shows 0 when
tied. The vocabulary is `model.vocab_size` if set, else the tokenizer config's bound
(bpe: its vocab_size, byte: 265), or the data's own (mqar). The counting itself is
`moa.models.params`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from moa.config import ModelConfig
from moa.errors import ConfigError
from moa.models.language_model import LanguageModel, build_model
from moa.models.params import measure_kv_cache, parameter_table
from moa.training.run_config import parse_run

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def model_config(overrides: list[str]) -> ModelConfig:
    """The checked ModelConfig of `conf/train.yaml` under `overrides`, vocabulary filled."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for `${hydra:...}` in the trainer/paths
    spec = parse_run(cfg)
    if spec.model.vocab_size is not None:
        return spec.model
    vocab = spec.tokenizer.max_vocab_size if spec.tokenizer is not None else spec.data.vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size", None, "a positive integer",
                          "the tokenizer's size is unknown until it is loaded")
    return spec.model.with_vocab(vocab)


def language_model_presets() -> list[str]:
    """The presets of conf/model/ whose model is the decoder language model, in name order:
    not the Reactive Transformer's (`architecture: reactive`), which trains in stages of
    its own objectives (docs/reactive.md)."""
    names = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))
    return [name for name in names
            if model_config([f"model={name}"]).architecture == "language_model"]


def format_table(rows: list[tuple[str, int]], title: str, notes: tuple[str, ...] = ()) -> str:
    """The table, `notes` (one line each), then `Total  <millions>M`."""
    total = sum(count for name, count in rows if not name.startswith(" "))
    width = max(len(name) for name, _ in rows + [("component", 0)])
    lines = [title, f"{'component':<{width}}  {'parameters':>13}  {'share':>6}"]
    for name, count in rows:
        lines.append(f"{name:<{width}}  {count:>13,}  {count / max(total, 1):>6.1%}")
    lines.extend(notes)
    lines.append(f"Total  {total / 1e6:.2f}M")
    return "\n".join(lines)


def kv_cache_note(config: ModelConfig) -> str:
    """The KV cache per token, measured on a freshly initialised model (`measure_kv_cache`:
    a short cached generation on random tokens): a trained model's balls keep another
    fraction, which its run.json records."""
    measure = measure_kv_cache(build_model(config))
    balls = "" if measure.kept_fraction is None else \
        f"; ball-pruned layers keep {measure.kept_fraction:.2f} of their keys at init"
    return (f"KV cache  {measure.bytes_per_token:,.0f} bytes/token (measured: batch 1, "
            f"{measure.tokens} random tokens cached, float32{balls})")


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        config = model_config(overrides)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    with torch.device("meta"):
        model = build_model(config)
    title = (f"model={config.name} size={config.size} d_model={config.d_model} "
             f"n_layers={config.n_layers} vocab={config.vocab_size}")
    # the Reactive Transformer caches per message, not per token
    notes = (kv_cache_note(config),) if isinstance(model, LanguageModel) else ()
    print(format_table(parameter_table(model), title, notes))

if __name__ == "__main__":
    main()
