"""Which model a `ModelConfig` builds: its `architecture` key -> the model class.

`language_model.py` registers the decoder (`language_model`), `reactive/` the Reactive
Transformer (`reactive`); `moa/models/__init__.py` imports both, so `build_model` knows
every architecture whichever module a caller imported it from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from moa.config import ModelConfig
from moa.schema import check_choice

MODELS: dict[str, type[nn.Module]] = {}


def register_model(architecture: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(model_class: type[nn.Module]) -> type[nn.Module]:
        if architecture in MODELS:
            raise ValueError(f"model architecture {architecture!r} is registered twice")
        MODELS[architecture] = model_class
        return model_class

    return add


def build_model(config: ModelConfig | Mapping[str, Any]) -> nn.Module:
    """The model a config (or its dict, as checkpoints store it) describes."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_dict(dict(config))
    check_choice("model.architecture", config.architecture, sorted(MODELS))
    return MODELS[config.architecture](config)
