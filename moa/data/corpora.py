"""The registered text corpora: `pydocs` (default, offline), local `text_files`, and `hf`.

Each loads its documents as Hugging Face `datasets` with a `text` column (`load_*`), and
its registered builder turns them into token splits (`corpus.token_splits`).
"""

from __future__ import annotations

import codecs
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from moa.data.corpus import Corpus, documents, make_corpus, token_splits
from moa.data.pydocs import pydocs_file
from moa.data.source import CORPORA, DataConfig, LMSplits
from moa.data.tokenizer import TokenizerConfig
from moa.errors import ConfigError
from moa.schema import check, check_choice

FILE_FORMATS = ("auto", "text", "json", "jsonl", "parquet", "csv")
BUILDER_OF_EXTENSION = {  # extension -> datasets' packaged builder
    ".txt": "text", ".text": "text", ".md": "text", ".raw": "text",
    ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
}


@dataclass
class PydocsConfig(DataConfig):
    name: str = "pydocs"


@dataclass
class TextFilesConfig(DataConfig):
    name: str = "text_files"
    # Each a glob or list of globs (typed Any: OmegaConf has no str | list union).
    train_files: Any = None
    val_files: Any = None  # None: carved from the train documents
    test_files: Any = None  # likewise
    format: str = "auto"  # auto: from the file extension
    text_field: str = "text"  # column holding the text, for json/jsonl/parquet/csv
    sample_by: str = "paragraph"  # text files: one document per line | paragraph | document
    separator: str | None = None  # text files: documents end at this string (sample_by ignored)

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("train_files", "val_files", "test_files"):
            globs = getattr(self, field)
            if isinstance(globs, str):
                setattr(self, field, [globs])
            elif globs is not None:
                check(isinstance(globs, list) and all(isinstance(g, str) for g in globs),
                      field, globs, "a glob or a list of globs")
        check(self.train_files is not None, "train_files", None, "a glob or a list of globs",
              "missing")
        check_choice("format", self.format, FILE_FORMATS)
        check_choice("sample_by", self.sample_by, ("document", "paragraph", "line"))
        check(self.separator is None or bool(self.separator), "separator", self.separator,
              "a non-empty string, or null")


@dataclass
class HFConfig(DataConfig):
    name: str = "hf"
    path: str | None = None  # hub dataset name (needs internet) or a local folder of files
    subset: str | None = None  # the dataset's configuration name, e.g. wikitext-2-raw-v1
    revision: str | None = None
    train_split: str = "train"
    val_split: str | None = None  # None: carved from the train documents
    test_split: str | None = None  # likewise
    text_field: str = "text"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.path), "path", self.path, "a hub dataset name or a local folder",
              "missing")


@CORPORA.register("pydocs", PydocsConfig)
def build_pydocs(
    config: PydocsConfig, tokenizer: TokenizerConfig | None, cache_dir: Path
) -> LMSplits:
    return token_splits(load_pydocs(config, cache_dir), config, tokenizer, cache_dir)


@CORPORA.register("text_files", TextFilesConfig)
def build_text_files(
    config: TextFilesConfig, tokenizer: TokenizerConfig | None, cache_dir: Path
) -> LMSplits:
    return token_splits(load_text_files(config, cache_dir), config, tokenizer, cache_dir)


@CORPORA.register("hf", HFConfig)
def build_hf(config: HFConfig, tokenizer: TokenizerConfig | None, cache_dir: Path) -> LMSplits:
    return token_splits(load_hf(config, cache_dir), config, tokenizer, cache_dir)


def load_pydocs(config: PydocsConfig, cache_dir: Path) -> Corpus:
    """CPython's bundled documentation (see `moa.data.pydocs`), built once per cache dir."""
    with pydocs_file(Path(cache_dir)).open(encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line in lines]
    train = documents(datasets.Dataset.from_dict({"text": texts}), "text", "data.name", "pydocs")
    return make_corpus("pydocs", {"train": train}, config, "data.name", "pydocs")


def load_text_files(config: TextFilesConfig, cache_dir: Path) -> Corpus:
    fields = {"train": "train_files", "validation": "val_files", "test": "test_files"}
    files = {split: _matching_files(getattr(config, field), f"data.{field}")
             for split, field in fields.items() if getattr(config, field) is not None}
    builder = _builder(config.format, [file for split in files.values() for file in split])
    sample_by = "document" if config.separator else config.sample_by
    options = {"sample_by": sample_by} if builder == "text" else {}
    try:
        loaded = datasets.load_dataset(builder, data_files=files,
                                       cache_dir=_hf_cache(cache_dir), **options)
    except datasets.exceptions.DatasetGenerationError:
        # datasets wraps a decoding error in its own; find the file only on this path
        for split, paths in files.items():
            for path in paths:
                reason = _not_utf8(path)
                check(reason is None, f"data.{fields[split]}", path, "UTF-8 text files", reason)
        raise
    if config.separator and builder == "text":
        loaded = loaded.map(lambda texts: {"text": [piece.strip() for text in texts
                                                    for piece in text.split(config.separator)]},
                            input_columns="text", batched=True)
    splits = {split: documents(loaded[split], config.text_field, f"data.{fields[split]}",
                               getattr(config, fields[split]))
              for split in files}
    return make_corpus(config.name, splits, config, "data.train_files", config.train_files)


def load_hf(config: HFConfig, cache_dir: Path) -> Corpus:
    """`datasets.load_dataset(path, subset, revision)`: the hub (online) or a local folder."""
    try:
        loaded = datasets.load_dataset(config.path, name=config.subset, revision=config.revision,
                                       cache_dir=_hf_cache(cache_dir))
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        raise ConfigError("data.path", config.path, "a hub dataset name or a local folder",
                          str(error).splitlines()[0] if str(error) else type(error).__name__
                          ) from None
    fields = {"train": "train_split", "validation": "val_split", "test": "test_split"}
    splits = {}
    for split, field in fields.items():
        name = getattr(config, field)
        if name is None:
            continue
        check(name in loaded, f"data.{field}", name, " | ".join(loaded), "no such split")
        splits[split] = documents(loaded[name], config.text_field, f"data.{field}", name)
    return make_corpus(config.name, splits, config, "data.path", config.path)


def _matching_files(globs: list[str], key: str) -> list[str]:
    files = []
    for pattern in globs:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        check(bool(matches), key, pattern, "a path or glob matching at least one file",
              "no such file")
        for match in matches:  # an empty file would fail inside `datasets` with a traceback
            check(not Path(match).is_file() or Path(match).stat().st_size > 0, key, match,
                  "data files with text in them", "the file is empty")
        files.extend(matches)
    return files


def _builder(file_format: str, files: list[str]) -> str:
    """The `datasets` packaged builder (text | json | parquet | csv) for `files`."""
    if file_format != "auto":
        return "json" if file_format == "jsonl" else file_format
    builders = {BUILDER_OF_EXTENSION.get(Path(file).suffix.lower()) for file in files}
    check(None not in builders and len(builders) == 1, "data.format", file_format,
          " | ".join(FILE_FORMATS[1:]),
          f"cannot tell one format from the extensions of {sorted(set(files))[:3]}")
    return builders.pop()


def _not_utf8(path: str) -> str | None:
    """Why `path` is not UTF-8 text (None if it is), read in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                return f"not UTF-8: {error.reason} at byte {offset + error.start}"
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        return f"not UTF-8: {error.reason} at the end"
    return None


def _hf_cache(cache_dir: Path) -> str:
    return str(Path(cache_dir) / "hf_datasets")
