"""Swap another attention scheme into a trained model, without retraining.

    config = swap_attention(model_config, {"name": "alcca", "k": 16})
    module = ...built from config...
    report = transfer_weights(module, trained_state_dict)

`swap_attention` carries every field of the trained attention config that the new scheme
also has (head layout, metric, alpha) unless the override sets it, so ALCCA swapped into
a metric-attention model uses its metric and its trained alpha under the same keys.

A dot-product model has no alpha: its ALCCA gets the l2 metric on the unchanged q and k,
and alpha = 1 / (2 sqrt(D)). Since -alpha ||q - k||^2 = 2 alpha q.k - alpha ||q||^2 -
alpha ||k||^2 and the ||q||^2 term is the same for every key of a query (it cancels in a
softmax), this alpha makes the q.k term exactly the trained logit q.k / sqrt(D); the one
difference left is a bias -||k_j||^2 / (2 sqrt(D)) against keys of large norm. Any other
alpha also rescales the trained logits (a temperature change), so this is the closest
choice. `transfer_weights` loads what fits and reports the rest: what it carried, what
stays at its initial values and which trained weights it had no place for (a MoA block's
paths, swapped for one attention, carry nothing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moa.config import ModelConfig
from moa.schema import to_plain


@dataclass
class TransferReport:
    carried: list[str]  # trained keys loaded into the new model
    missing: list[str]  # keys of the new model left at their initial values
    unexpected: list[str]  # trained keys the new model has no place for

    def derived(self, trained: ModelConfig) -> list[str]:
        """Missing keys that `swap_attention` sets from the trained model's config: the
        alpha of a dot-product model (1 / (2 sqrt(D)), its logits' own scale)."""
        if "alpha_init" in dataclasses.asdict(trained.attention):
            return []
        return [key for key in self.missing if key.endswith("attention.log_alpha")]

    def untrained(self, trained: ModelConfig) -> list[str]:
        """Keys of the new model that nothing trained sets: left at their random init."""
        derived = set(self.derived(trained))
        return [key for key in self.missing if key not in derived]


def swap_attention(config: ModelConfig, override: Mapping[str, Any]) -> ModelConfig:
    """`config` with its attention replaced by the scheme `override["name"]`."""
    from moa.attention import ATTENTION

    override = dict(to_plain(override))
    source = dataclasses.asdict(config.attention)
    target = ATTENTION.entry(override["name"], "attention_override").config
    fields = {f.name for f in dataclasses.fields(target)}
    attention = {key: source[key] for key in fields & set(source) - {"name"}}
    if "alpha_init" in fields and "alpha_init" not in source:  # from dot-product attention
        attention["alpha_init"] = 1.0 / (2.0 * math.sqrt(config.head_dim))
    attention.update(override)
    data = config.to_dict()
    data["attention"] = attention
    return ModelConfig.from_dict(data)


def transfer_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> TransferReport:
    """Load every trained tensor the module has a place for; report the others."""
    result = module.load_state_dict(dict(state_dict), strict=False)
    carried = sorted(set(state_dict) & set(module.state_dict()))
    return TransferReport(carried, sorted(result.missing_keys), sorted(result.unexpected_keys))
