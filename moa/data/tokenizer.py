"""Tokenizers: byte-level BPE trained on the corpus, raw bytes, or a saved/pretrained file.

Every choice yields the same `Tokenizer` wrapper around a `tokenizers.Tokenizer`, always
holding `SPECIAL_TOKENS` as single tokens, and the config's `special_tokens` after them
(the Reactive Transformer's `[Q]`, `[A]`, `[MASK]`: conf/tokenizer/rxt_bpe.yaml).
Byte-level models never lose information: any text encodes and decodes back exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moa.data.cache_file import written_atomically
from moa.errors import ConfigError
from moa.registry import Registry
from moa.schema import check, check_range

SPECIAL_TOKENS = (
    "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|think|>", "<|reasoning|>",
)


class Tokenizer:
    """Text <-> token ids, with the special tokens' ids at hand.

    Special tokens missing from `backend` (a hub tokenizer, say) are appended to its
    vocabulary, `SPECIAL_TOKENS` then `special_tokens`, so every tokenizer has them; ids of
    tokens it already has never change.
    """

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: Iterable[str] = ()) -> None:
        missing = [token for token in (*SPECIAL_TOKENS, *special_tokens)
                   if backend.token_to_id(token) is None]
        if missing:
            backend.add_special_tokens(missing)
        self._backend = backend
        self.sha256 = hashlib.sha256(backend.to_str().encode()).hexdigest()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            backend.token_to_id(token) for token in SPECIAL_TOKENS[:4]
        )

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        """Ids of every special token the tokenizer holds (its own and ours), sorted."""
        return sorted(i for i, token in self._backend.get_added_tokens_decoder().items()
                      if token.special)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in `text`."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens written out (`<|eos|>`), not dropped."""
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (loadable here and by `tokenizers`/`transformers`)."""
        with written_atomically(Path(path)) as partial:  # never half a file under its name
            self._backend.save(str(partial))

    @classmethod
    def load(cls, path: str | Path, key: str = "tokenizer.path",
             special_tokens: Iterable[str] = ()) -> Tokenizer:
        """Read a tokenizer.json; a missing or unreadable file is a ConfigError on `key`."""
        allowed = "a tokenizer.json file (as written by Tokenizer.save) or a hub name"
        if not Path(path).is_file():
            raise ConfigError(key, str(path), allowed, "file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises bare Exception on bad JSON
            reason = f"not a valid tokenizer file: {str(error).splitlines()[0]}"
            raise ConfigError(key, str(path), allowed, reason) from None
        return cls(backend, special_tokens)


# Each config's `max_vocab_size` bounds `Tokenizer.vocab_size` before anything is built
# (None: unknown until loaded), so the model's vocabulary can be checked up front.


@dataclass
class SpecialTokensConfig:
    """The special tokens a tokenizer holds after `SPECIAL_TOKENS` (each one token, never
    split nor merged), e.g. `[Q]`, `[A]`, `[MASK]`."""

    special_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        tokens = self.special_tokens
        check(all(isinstance(t, str) and t for t in tokens) and len(set(tokens)) == len(tokens)
              and not set(tokens) & set(SPECIAL_TOKENS), "special_tokens", tokens,
              f"distinct non-empty strings other than {list(SPECIAL_TOKENS)}")

    @property
    def all_special_tokens(self) -> tuple[str, ...]:
        return (*SPECIAL_TOKENS, *self.special_tokens)


@dataclass
class BPEConfig(SpecialTokensConfig):
    name: str = "bpe"
    vocab_size: int = 8192  # including the special tokens; a small corpus may yield fewer
    min_frequency: int = 2  # a pair must occur this often to be merged
    train_files: list[str] | None = None  # train on these text files, not on the data's text

    def __post_init__(self) -> None:
        super().__post_init__()
        least = 256 + len(self.all_special_tokens)
        check(self.vocab_size >= least, "vocab_size", self.vocab_size,
              f">= {least} (the 256 byte tokens and the special tokens)")
        check_range("min_frequency", self.min_frequency, 1)

    @property
    def max_vocab_size(self) -> int:
        return self.vocab_size


@dataclass
class ByteConfig(SpecialTokensConfig):
    name: str = "byte"

    @property
    def max_vocab_size(self) -> int:
        return 256 + len(self.all_special_tokens)


@dataclass
class PretrainedConfig(SpecialTokensConfig):
    name: str = "pretrained"
    path: str | None = None  # tokenizer.json file (e.g. RUN_DIR/tokenizer.json) or hub name
    revision: str | None = None  # hub revision; ignored for files

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.path), "path", self.path, "a tokenizer.json path or a hub name", "missing")

    @property
    def max_vocab_size(self) -> None:
        return None


TokenizerConfig = BPEConfig | ByteConfig | PretrainedConfig

# builder(config, train_texts: Iterable[str], corpus_sha256: str, cache_dir: Path) -> Tokenizer
TOKENIZERS: Registry[Tokenizer] = Registry("tokenizer")


@TOKENIZERS.register("bpe", BPEConfig)
def build_bpe(
    config: BPEConfig, train_texts: Iterable[str], corpus_sha256: str, cache_dir: Path
) -> Tokenizer:
    """Byte-level BPE trained once per (corpus, vocab_size, min_frequency, special tokens) on
    `train_texts`, or on the lines of `config.train_files` where given."""
    if config.train_files:
        train_texts, corpus_sha256 = _lines_and_sha256(config.train_files)
    specials = ""
    if config.special_tokens:
        specials = "-s" + hashlib.sha256("\0".join(config.special_tokens).encode()).hexdigest()[:8]
    path = (Path(cache_dir) / "tokenizers" / f"bpe-{corpus_sha256[:16]}-v{config.vocab_size}"
            f"-f{config.min_frequency}{specials}.json")
    if path.is_file():
        return Tokenizer.load(path, key="tokenizer")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(config.all_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    backend.train_from_iterator(train_texts, trainer)
    tokenizer = Tokenizer(backend)
    tokenizer.save(path)
    return tokenizer


@TOKENIZERS.register("byte", ByteConfig)
def build_byte(config: ByteConfig, *_unused: object) -> Tokenizer:
    """Token id b is byte b (0..255); the special tokens follow from 256."""
    # byte-level pre-tokenization maps each byte to a printable character; a BPE model
    # without merges then emits exactly one token per byte.
    vocab = {char: byte for byte, char in enumerate(_byte_level_chars())}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, config.special_tokens)


@TOKENIZERS.register("pretrained", PretrainedConfig)
def build_pretrained(config: PretrainedConfig, *_unused: object) -> Tokenizer:
    """A tokenizer.json file, or a hub name (downloads: needs internet)."""
    path = Path(config.path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    names_a_file = config.path.endswith(".json") or config.path.startswith((".", "/", "~"))
    if path.exists() or names_a_file:
        return Tokenizer.load(path, special_tokens=config.special_tokens)
    try:
        backend = tokenizers.Tokenizer.from_pretrained(
            config.path, revision=config.revision or "main")
    except Exception as error:  # network, missing repo or file: one line for the user
        raise ConfigError("tokenizer.path", config.path, "a tokenizer.json path or a hub name",
                          f"hub download failed: {str(error).splitlines()[0]}") from None
    return Tokenizer(backend, config.special_tokens)


def _lines_and_sha256(files: list[str]) -> tuple[list[str], str]:
    """The non-empty lines of `files` and the sha256 of their bytes."""
    digest, lines = hashlib.sha256(), []
    for file in files:
        check(Path(file).is_file(), "tokenizer.train_files", file, "text files", "no such file")
        data = Path(file).read_bytes()
        digest.update(data + b"\0")
        lines += [line for line in data.decode("utf-8").splitlines() if line.strip()]
    return lines, digest.hexdigest()


def _byte_level_chars() -> list[str]:
    """The printable character the ByteLevel pre-tokenizer uses for each byte 0..255 (GPT-2)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))  # the others, in byte order, map past Latin-1
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]
