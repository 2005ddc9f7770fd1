"""moa: a config-driven research framework for mixture-of-attention language models."""

from moa.config import ModelConfig
from moa.model import LanguageModel, build_model

__all__ = ["LanguageModel", "ModelConfig", "build_model"]
