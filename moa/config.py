"""Typed configs for the model and the optimiser, and the check of a whole run config.

`ModelConfig` is what `build_model` takes: the `model` section's sizes plus the parsed
configs of the `attention`, `ffn`, `position`, `norm` and `head` groups. It round-trips
through a plain dict, which is what checkpoints store beside the weights.
`model.architecture` picks the model it describes: `language_model` (the decoder,
`ModelConfig`) or `reactive` (the Reactive Transformer, `ReactiveConfig`, which adds its
memory and its other attentions to the same keys).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from moa.errors import ConfigError
from moa.schema import check, check_choice, check_range, parse, to_plain

COMPONENTS = ("attention", "ffn", "position", "norm", "head")
ARCHITECTURES = ("language_model", "reactive")
MEMORY_VARIANTS = ("simple", "interlayer")
MEMORY_GATES = ("slot", "linear")
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
    architecture: str = "language_model"  # language_model | reactive (ReactiveConfig)
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
        check_choice("architecture", self.architecture, ARCHITECTURES)
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
        model = to_plain(model)
        config = parse(model_config_class(model), model, "model")
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


def model_config_class(model: Any) -> type[ModelConfig]:
    """The config dataclass of a `model` section, by its `architecture` key."""
    architecture = model.get("architecture", "language_model") if isinstance(model, dict) \
        else "language_model"
    check_choice("model.architecture", architecture, ARCHITECTURES)
    return ReactiveConfig if architecture == "reactive" else ModelConfig


@dataclass
class MemoryAttentionConfig:
    """The Reactive Transformer's memory write: per layer l,
    `update = Attn(Q = norm(STM_l), K = V = norm(ED_l))`, `STM_l <- (1 - G) STM_l + G update`."""

    variant: str = "simple"  # simple | interlayer (each layer first reads the layers' mean)
    gate: str = "slot"  # slot: a learned logit per layer and slot | linear: w . (STM + update)
    gate_init: float = 0.0  # the gate's initial logit: G starts at sigmoid(gate_init)
    attention: Any = None  # its scheme (an attention config); None: dot_product, n_heads

    def __post_init__(self) -> None:
        # Only ever the `memory_attention` field of the model: keys named from there.
        check_choice("memory_attention.variant", self.variant, MEMORY_VARIANTS)
        check_choice("memory_attention.gate", self.gate, MEMORY_GATES)


@dataclass
class ReactiveConfig(ModelConfig):
    """The Reactive Transformer (RxT): `ModelConfig`'s keys describe the encoder and the
    decoder alike (d_model, n_layers each, n_heads, the ffn/position/norm groups; the
    `attention` group is the encoder's self-attention, `head` the decoder's LM head;
    max_seq_len is one message), plus the short-term memory and its attentions."""

    name: str = "rxt_alpha_micro"
    architecture: str = "reactive"
    stm_slots: int = 256  # memory slots per layer: the STM is (n_layers, B, slots, d_model)
    stm_init_std: float = 0.02  # the fixed initial STM ~ N(0, std^2), drawn at init
    encoder_reads_memory: bool = True  # RxNN's RxT-Alpha encoder: memory cross-attention too
    decoder_attention: Any = None  # the decoder's causal self-attention; None: `attention`'s
    cross_attention: Any = None  # memory cross-attention (decoder, encoder); None: dot_product
    memory_attention: MemoryAttentionConfig = field(default_factory=MemoryAttentionConfig)
    pad_id: int = 0  # token ids the model needs, from the tokenizer (the model never reads it)
    mask_id: int | None = None  # [MASK], for the MLM objective
    query_id: int | None = None  # [Q], opens a query
    answer_id: int | None = None  # [A], opens an answer: `respond` starts generating after it
    end_id: int | None = None  # ends an answer: `respond` stops there

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.architecture == "reactive", "architecture", self.architecture, "reactive")
        check(self.stm_slots > 0, "stm_slots", self.stm_slots, "a positive integer")
        check(self.stm_init_std >= 0, "stm_init_std", self.stm_init_std, ">= 0")
        for key in ("pad_id", "mask_id", "query_id", "answer_id", "end_id"):
            value = getattr(self, key)
            check(value is None or value >= 0, key, value, "a token id >= 0")
        check(self.layer_scale_init is None, "layer_scale_init", self.layer_scale_init,
              "null (the Reactive Transformer's blocks have no LayerScale)")
        check(self.drop_path == 0, "drop_path", self.drop_path,
              "0.0 (the Reactive Transformer's blocks have no stochastic depth)")
        if self.attention is None:  # parsed as a plain `model` section: schemes come next
            return
        try:
            check_bidirectional(self.attention)  # the encoder's self-attention
            _check_no_auxiliary_loss(self.attention)
        except ConfigError as error:
            raise error.under("attention") from None
        check(self.ffn.placement == "block", "ffn.placement", self.ffn.placement,
              "block (each Reactive Transformer layer has its FFN)")
        check(self.head.name == "linear", "head.name", self.head.name,
              "linear (the decoder's LM head)")
        try:  # after `from_sections` gave the components: keys named from `model`
            self.decoder_attention = self._scheme("decoder_attention", self.decoder_attention,
                                                  self.attention, bidirectional=False)
            self.cross_attention = self._scheme("cross_attention", self.cross_attention,
                                                {"name": "dot_product"}, bidirectional=True)
            self.memory_attention.attention = self._scheme(
                "memory_attention.attention", self.memory_attention.attention,
                {"name": "dot_product"}, bidirectional=True)
        except ConfigError as error:
            raise error.under("model") from None

    def _scheme(self, key: str, data: Any, default: Any, bidirectional: bool) -> Any:
        """The parsed attention config at `key`, checked against this model; where it must
        see every key (the memory reads), checked that it can."""
        from moa.attention import ATTENTION

        data = default if data is None else data
        name = data.get("name") if isinstance(data, dict) else getattr(data, "name", None)
        try:
            if bidirectional and name is not None:  # before its keys: theirs may not fit
                check_sees_every_key(name)
            scheme = ATTENTION.parse(data, "attention")
            validate = getattr(scheme, "validate_for", None)
            if validate is not None:
                validate(self)
            if bidirectional:
                check_bidirectional(scheme)
            _check_no_auxiliary_loss(scheme)
        except ConfigError as error:
            inner = error.key.removeprefix("attention").removeprefix(".")
            raise ConfigError(f"{key}.{inner}", error.value, error.allowed,
                              error.reason) from None
        return scheme


def _check_no_auxiliary_loss(scheme: Any) -> None:
    weight = getattr(scheme, "ti_reg_weight", 0.0)
    check(weight == 0, "ti_reg_weight", weight, "0.0",
          "the Reactive Transformer's objectives take no auxiliary losses")


def check_bidirectional(scheme: Any) -> None:
    """Refuse an attention scheme that cannot see every key (causal-only ones), where an
    encoder or a memory read needs it; keys named from the scheme (`name`, `use_balls`)."""
    check_sees_every_key(scheme.name)
    getattr(scheme, "check_bidirectional", lambda: None)()


def check_sees_every_key(name: str) -> None:
    from moa.attention import ATTENTION

    def able(scheme: str) -> bool:
        return getattr(ATTENTION.entry(scheme).builder, "bidirectional", False)

    check(able(name), "name", name,
          " | ".join(scheme for scheme in ATTENTION.names() if able(scheme)),
          "a causal-only scheme where every key must be seen")


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
    impl: str = "auto"  # AdamW's step: auto | fused | foreach | for_loop (moa/training/optim.py)

    def __post_init__(self) -> None:
        check_choice("name", self.name, ["adamw"])
        check_choice("impl", self.impl, ["auto", "fused", "foreach", "for_loop"])
        check(self.lr > 0, "lr", self.lr, "a positive float")
        for i, beta in enumerate(self.betas):
            check(0 <= beta < 1, f"betas[{i}]", beta, "0 <= beta < 1")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check_choice("schedule", self.schedule, ["cosine", "constant"])
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check(self.nonfinite_patience >= 1, "nonfinite_patience", self.nonfinite_patience,
              "a positive integer")
