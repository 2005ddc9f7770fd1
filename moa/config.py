"""Typed configs for the model and the optimiser, and the check of a whole run config.

`ModelConfig` is what `build_model` takes: the `model` section's sizes plus the parsed
configs of the `attention`, `ffn`, `position`, `norm` and `head` groups. It round-trips
through a plain dict, which is what checkpoints store beside the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from moa.errors import ConfigError
from moa.schema import check, check_choice, check_range, parse, to_plain

COMPONENTS = ("attention", "ffn", "position", "norm", "head")
# What a component left out means: configs and checkpoints from before `head` was a group.
DEFAULT_COMPONENTS = {"head": {"name": "linear"}}


def _register_resolvers() -> None:
    # `${floordiv:${model.n_heads},2}` lets a preset say "half the model's heads".
    if not OmegaConf.has_resolver("floordiv"):
        OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b))


_register_resolvers()


@dataclass
class ModelConfig:
    name: str = "gpt"
    size: str = "small"
    sizes: dict[str, Any] = field(default_factory=dict)  # size name -> its values, read by the YAML
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None  # width of each head; None: d_model // n_heads (set at parse)
    vocab_size: int | None = None  # None: taken from the tokenizer
    max_seq_len: int = 256
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    layer_scale_init: float | None = None  # LayerScale on both branches, started here; None: off
    drop_path: float = 0.0  # stochastic depth: probability of dropping a branch per sequence
    card_config: str | None = None  # a MoA card's config.json, applied by moa.training.card
    compile: bool = False  # torch.compile for training: how the model runs, not what it is
    attention: Any = None
    ffn: Any = None
    position: Any = None
    norm: Any = None
    head: Any = None

    def __post_init__(self) -> None:
        check(self.d_model > 0, "d_model", self.d_model, "a positive integer")
        check(self.n_layers > 0, "n_layers", self.n_layers, "a positive integer")
        check(self.n_heads > 0, "n_heads", self.n_heads, "a positive integer")
        if self.head_dim is None:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            check(self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
                  f"divisors of d_model={self.d_model}: {divisors[:16]}",
                  "d_model must be divisible by n_heads (or set model.head_dim)")
            self.head_dim = self.d_model // self.n_heads
        check(self.head_dim > 0, "head_dim", self.head_dim,
              "a positive integer, or null for d_model // n_heads")
        check(self.vocab_size is None or self.vocab_size > 0, "vocab_size", self.vocab_size,
              "a positive integer, or null to take the tokenizer's")
        check(self.max_seq_len > 0, "max_seq_len", self.max_seq_len, "a positive integer")
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check(self.init_std > 0, "init_std", self.init_std, "a positive float")
        check(self.layer_scale_init is None or self.layer_scale_init > 0, "layer_scale_init",
              self.layer_scale_init, "a positive float, or null for no LayerScale")
        check_range("drop_path", self.drop_path, 0.0, 1.0, high_open=True)
        if self.sizes:
            check_choice("size", self.size, sorted(self.sizes))

    @classmethod
    def from_sections(cls, model: Any, **components: Any) -> ModelConfig:
        """Parse the `model` section and each component group, then check them together."""
        from moa.attention import ATTENTION
        from moa.layers.ffn import FFN
        from moa.layers.head import HEAD
        from moa.layers.norm import NORM
        from moa.layers.position import POSITION

        registries = {"attention": ATTENTION, "ffn": FFN, "position": POSITION, "norm": NORM,
                      "head": HEAD}
        config = parse(cls, to_plain(model), "model")
        parsed = {name: registries[name].parse(components.get(name, DEFAULT_COMPONENTS.get(name)),
                                               name)
                  for name in COMPONENTS}
        config = dataclasses.replace(config, **parsed)
        for name in COMPONENTS:
            validate = getattr(parsed[name], "validate_for", None)
            if validate is not None:
                validate(config)
        return config

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(to_plain(data))
        components = {name: data.pop(name) for name in COMPONENTS if name in data}
        return cls.from_sections(data, **components)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_vocab(self, tokenizer_vocab: int) -> ModelConfig:
        """Fill `vocab_size` from the tokenizer, or check that the set one can hold it."""
        if self.vocab_size is None:
            return dataclasses.replace(self, vocab_size=tokenizer_vocab)
        if self.vocab_size < tokenizer_vocab:
            raise ConfigError("model.vocab_size", self.vocab_size,
                              f">= {tokenizer_vocab} (the tokenizer's vocabulary), or null",
                              "smaller than the tokenizer's vocabulary")
        return self


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant (after warmup)
    min_lr_ratio: float = 0.1  # final lr of the cosine, as a fraction of lr
    nonfinite_patience: int = 10  # non-finite steps in a row (each skipped) that stop the run

    def __post_init__(self) -> None:
        check_choice("name", self.name, ["adamw"])
        check(self.lr > 0, "lr", self.lr, "a positive float")
        for i, beta in enumerate(self.betas):
            check(0 <= beta < 1, f"betas[{i}]", beta, "0 <= beta < 1")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check_choice("schedule", self.schedule, ["cosine", "constant"])
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check(self.nonfinite_patience >= 1, "nonfinite_patience", self.nonfinite_patience,
              "a positive integer")
