"""A MoA card's `config.json`, keys as written, applied onto a run config.

    python train.py model=moa_metric model.card_config=path/to/config.json

The MoA cards (MoA-100M, DiscoverLM-70M) publish their models with a flat config.json:
`dim`, `attn_heads`, `mqa_q_heads`, `mixer_hidden`, `router_topk`, `theta_base`, ...
`apply_card_config` reads one onto a composed run config whose attention is the cards'
MoA block (`attention=moa`: paths local_conv, metric MHA, channel_mix, metric MQA; head
`head=moa`: MHA, MQA, channel_mix), before the config is parsed: each card key sets the
run-config entries `CARD_KEYS` names, so the card's values win over the preset's and the
groups'. Hugging Face's bookkeeping keys (`IGNORED_KEYS`) are skipped; any other key is
an error that names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from moa.errors import ConfigError

CONFIG_KEY = "model.card_config"
METRIC_PATHS = ("attention.paths.1", "attention.paths.3")  # metric MHA, metric MQA
HYPER_FFN_BRANCHES = ["swiglu", "conv", "low_rank"]

CARD_KEYS: dict[str, tuple[str, ...]] = {
    "dim": ("model.d_model",),
    "num_layers": ("model.n_layers",),
    "attn_heads": ("model.n_heads",),
    "vocab_size": ("model.vocab_size",),
    "max_position_embeddings": ("model.max_seq_len",),
    "initializer_range": ("model.init_std",),
    "tie_word_embeddings": ("model.tie_embeddings",),
    "layer_scale_init_value": ("model.layer_scale_init",),
    "drop_path": ("model.drop_path",),
    "conv_kernel": ("attention.paths.0.conv_kernel", "ffn.conv_kernel"),
    "mixer_hidden": ("attention.paths.2.mixer_hidden",),
    "mqa_q_heads": ("attention.paths.3.n_q_heads",),
    "metric": ("metric.name",),
    "maha_init": ("metric.maha_init",),
    **{key: tuple(f"{path}.{key}" for path in METRIC_PATHS) for key in (
        "alpha_init", "learn_alpha", "use_balls", "radius_init", "learn_radius",
        "origin_init_scale", "attn_drop", "proj_drop", "ti_reg_weight", "ti_reg_samples")},
    **{key: (f"router.{key}",) for key in (
        "router_hidden", "router_topk", "router_temperature", "router_dropout",
        "enable_feature_gates", "enable_router_gates")},
    "ffn_hidden": ("ffn.hidden_dim",),
    "conv_mult": ("ffn.conv_mult",),
    "lr_rank": ("ffn.lr_rank",),
    "n_branches": ("ffn.branches",),
    "theta_base": ("position.theta_base",),
    "r_basis": ("position.r_basis",),
    "energy_amplification": ("position.energy_amplification",),
    "lm_head_dim": ("head.head_dim",),
    "lm_attn_heads": ("head.attention.paths.0.n_q_heads",),
    "lm_mqa_q_heads": ("head.attention.paths.1.n_q_heads",),
    "lm_mixer_hidden": ("head.attention.paths.2.mixer_hidden",),
    "lm_ffn_hidden": ("head.ffn.hidden_dim",),
    "lm_proj_drop": ("head.proj_drop",),
    **{f"lm_{key}": (f"head.attention.router.{key}",) for key in (
        "router_hidden", "router_topk", "router_temperature", "router_dropout")},
}
# Values that the card writes differently from us.
CONVERT: dict[str, Callable[[Any], Any]] = {
    "n_branches": lambda n: HYPER_FFN_BRANCHES[:n],
}
IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype",
    "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
}
MOA_BLOCK = ["local_conv", "metric", "channel_mix", "metric"]


def read_card_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(CONFIG_KEY, path, "a card's config.json", "file not found")
    try:
        card = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(CONFIG_KEY, path, "a card's config.json", f"not JSON: {error}") \
            from None
    if not isinstance(card, dict):
        raise ConfigError(CONFIG_KEY, path, "a JSON object of card keys", "not an object")
    return card


def card_overrides(card: dict[str, Any], path: str) -> dict[str, Any]:
    """{run-config key: value} for each key of `card` (read from `path`)."""
    unknown = sorted(set(card) - set(CARD_KEYS) - IGNORED_KEYS)
    if unknown:
        raise ConfigError(CONFIG_KEY, path, f"card keys {sorted(CARD_KEYS)}",
                          f"unknown key {unknown[0]!r}")
    if "n_branches" in card and card["n_branches"] not in range(1, 4):
        raise ConfigError(f"{CONFIG_KEY}:n_branches", card["n_branches"], "1, 2 or 3",
                          f"the HyperFFN's branches are {HYPER_FFN_BRANCHES}")
    overrides = {}
    for key, value in card.items():
        for target in CARD_KEYS.get(key, ()):
            overrides[target] = CONVERT.get(key, lambda v: v)(value)
    return overrides


def apply_card_config(cfg: DictConfig) -> None:
    """Set the run config's entries from `model.card_config`, if given (in place)."""
    path = OmegaConf.select(cfg, CONFIG_KEY)
    if not path:
        return
    paths = OmegaConf.select(cfg, "attention.paths") or []
    if [OmegaConf.select(p, "name") for p in paths] != MOA_BLOCK:
        raise ConfigError(CONFIG_KEY, path, "a model with attention=moa (model=moa_metric or "
                          "model=discoverlm)", "the card keys address the MoA block's paths")
    overrides = card_overrides(read_card_config(path), path)
    with open_dict(cfg):
        for target, value in overrides.items():
            OmegaConf.update(cfg, target, value, merge=False)
