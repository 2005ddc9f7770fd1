"""moa: a config-driven research framework for mixture-of-attention language models."""

from moa.config import ModelConfig
from moa.hf.registration import register_with_transformers
from moa.models.language_model import LanguageModel, build_model

register_with_transformers()  # model_type "moa_metric" for the Auto classes (moa.hf.modeling)

__all__ = ["LanguageModel", "ModelConfig", "build_model"]
