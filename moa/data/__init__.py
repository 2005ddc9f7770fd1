"""Data: tokenizers, text corpora, conversations, the MQAR and dialogue-recall tasks, MLM
masking and the DataModule.

Importing this package registers every tokenizer (`TOKENIZERS`) and data source (`CORPORA`).
"""

from moa.data.chat import ChatConfig
from moa.data.corpora import HFConfig, PydocsConfig, TextFilesConfig
from moa.data.datamodule import LMDataModule, build_datamodule
from moa.data.dialogue_recall import DialogueRecallConfig
from moa.data.interactions import InteractionsConfig
from moa.data.mqar import MQARConfig, multiquery_ar
from moa.data.source import CORPORA, SPLITS, DataConfig, LMSplits
from moa.data.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZERS,
    BPEConfig,
    ByteConfig,
    PretrainedConfig,
    Tokenizer,
    TokenizerConfig,
)

__all__ = [
    "CORPORA", "SPECIAL_TOKENS", "SPLITS", "TOKENIZERS", "BPEConfig", "ByteConfig", "ChatConfig",
    "DataConfig",
    "DialogueRecallConfig", "InteractionsConfig",
    "HFConfig", "LMDataModule", "LMSplits", "MQARConfig", "PretrainedConfig", "PydocsConfig",
    "TextFilesConfig", "Tokenizer", "TokenizerConfig", "build_datamodule", "multiquery_ar",
]
