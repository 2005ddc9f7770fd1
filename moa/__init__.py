"""moa: a config-driven research framework for mixture-of-attention language models."""

from importlib.util import find_spec

from moa.config import ModelConfig
from moa.model import LanguageModel, build_model

if find_spec("transformers") is not None:
    import moa.hf  # noqa: F401  registers model_type "moa_metric" with the Auto classes

__all__ = ["LanguageModel", "ModelConfig", "build_model"]
