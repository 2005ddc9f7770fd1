"""Tokenizers: exact round trips on real text, single-token specials, caching, bad files."""

from __future__ import annotations

import json

import pytest
import tokenizers
from omegaconf import OmegaConf

from moa.data.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZERS,
    BPEConfig,
    ByteConfig,
    PretrainedConfig,
    Tokenizer,
)
from moa.errors import ConfigError
from tests.conftest import CONF_DIR

FAKE_SHA = "0" * 64  # corpus hash for tokenizers trained on the sample below


@pytest.fixture(scope="module")
def training_texts(shared_data) -> list[str]:
    shakespeare = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:150_000]
    stories = (shared_data / "tinystories" / "TinyStories-train.first2MiB.txt").read_text()
    return shakespeare.split("\n\n") + stories[:150_000].split("<|endoftext|>")


@pytest.fixture(scope="module")
def unseen_texts(shared_data) -> list[str]:
    """Text the tokenizers were not trained on, with non-ASCII scripts and odd whitespace."""
    wiki = (shared_data / "wikitext-2" / "train.txt").read_text()[:4000]  # has Japanese
    records = json.loads((shared_data / "alpaca" / "alpaca_data_1k.json").read_text())
    return [wiki, *(r["output"] for r in records[:50]),
            "naïve café — Ωμέγα, 戦場のヴァルキュリア, emoji 🙂👍🏽", "  two  spaces\t\ttabs\r\n\n",
            "", " ", "\x00 control \x7f", "ends with newline\n"]


@pytest.fixture(scope="module")
def bpe_tokenizer(training_texts, tmp_path_factory) -> Tokenizer:
    cache = tmp_path_factory.mktemp("bpe-cache")
    return TOKENIZERS.build(BPEConfig(vocab_size=1000), iter(training_texts), FAKE_SHA, cache)


@pytest.fixture(scope="module", params=["bpe", "byte", "pretrained"])
def tokenizer(request, bpe_tokenizer, tmp_path_factory) -> Tokenizer:
    if request.param == "bpe":
        return bpe_tokenizer
    if request.param == "byte":
        return TOKENIZERS.build(ByteConfig())
    path = tmp_path_factory.mktemp("saved") / "tokenizer.json"
    bpe_tokenizer.save(path)
    return TOKENIZERS.build(PretrainedConfig(path=str(path)))


def test_round_trip_is_exact(tokenizer, training_texts, unseen_texts):
    for text in training_texts[:200] + unseen_texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch(unseen_texts) == [tokenizer.encode(t) for t in unseen_texts]


def test_special_tokens_are_single_distinct_tokens(tokenizer):
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and max(ids) < tokenizer.vocab_size
    assert [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id] == ids[:4]
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token) == [token_id]
        assert tokenizer.decode([token_id]) == token
    chat = "<|user|>Hi<|assistant|>Hello<|eos|>"
    encoded = tokenizer.encode(chat)
    assert encoded[0] == tokenizer.token_to_id("<|user|>") and encoded[-1] == tokenizer.eos_id
    assert tokenizer.decode(encoded) == chat


def test_byte_tokenizer_ids_are_the_utf8_bytes():
    byte = TOKENIZERS.build(ByteConfig())
    text = "héllo 戦場 🙂"
    assert byte.encode(text) == list(text.encode("utf-8"))
    assert byte.vocab_size == ByteConfig().max_vocab_size == 256 + len(SPECIAL_TOKENS)
    assert byte.bos_id == 256


def test_bpe_respects_vocab_size_and_compresses(bpe_tokenizer, unseen_texts):
    assert bpe_tokenizer.vocab_size <= BPEConfig(vocab_size=1000).max_vocab_size == 1000
    special_ids = [bpe_tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    assert special_ids == list(range(len(SPECIAL_TOKENS)))
    story = unseen_texts[1]
    assert len(bpe_tokenizer.encode(story)) < 0.5 * len(story.encode())


def test_bpe_cache_hit_does_not_retrain(training_texts, tmp_path):
    config = BPEConfig(vocab_size=400, min_frequency=3)
    first = TOKENIZERS.build(config, iter(training_texts[:300]), FAKE_SHA, tmp_path)

    def must_not_be_read():
        raise AssertionError("the cached tokenizer was retrained")
        yield

    again = TOKENIZERS.build(config, must_not_be_read(), FAKE_SHA, tmp_path)
    assert again.sha256 == first.sha256
    other_corpus = TOKENIZERS.build(config, iter(training_texts[300:600]), "1" * 64, tmp_path)
    assert other_corpus.sha256 != first.sha256
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 2


def test_save_and_load_keep_the_tokenizer(bpe_tokenizer, tmp_path, unseen_texts):
    path = tmp_path / "run" / "tokenizer.json"
    bpe_tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == bpe_tokenizer.sha256
    assert loaded.encode_batch(unseen_texts) == bpe_tokenizer.encode_batch(unseen_texts)
    assert tokenizers.Tokenizer.from_file(str(path)).get_vocab_size() == loaded.vocab_size


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"model": "nope"})])
def test_missing_or_corrupt_file_is_a_config_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as error:
        TOKENIZERS.build(TOKENIZERS.parse({"name": "pretrained", "path": str(path)}))
    assert error.value.key == "tokenizer.path"
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_pretrained_without_specials_gets_them_appended(tmp_path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = TOKENIZERS.build(PretrainedConfig(path=str(tmp_path)))  # a folder works too
    assert loaded.encode("hello world") == [1, 2]
    assert loaded.vocab_size == 3 + len(SPECIAL_TOKENS)
    assert sorted(loaded.token_to_id(t) for t in SPECIAL_TOKENS) == list(range(3, 12))


@pytest.mark.parametrize(("mapping", "key"), [
    ({"name": "bpe", "vocab_size": 100}, "tokenizer.vocab_size"),
    ({"name": "bpe", "min_frequency": 0}, "tokenizer.min_frequency"),
    ({"name": "pretrained"}, "tokenizer.path"),
    ({"name": "wordpiece"}, "tokenizer.name"),
])
def test_bad_config_names_its_key(mapping, key):
    with pytest.raises(ConfigError) as error:
        TOKENIZERS.parse(mapping, "tokenizer")
    assert error.value.key == key


TOKENIZER_YAMLS = sorted((CONF_DIR / "tokenizer").glob("*.yaml"))


@pytest.mark.parametrize("path", TOKENIZER_YAMLS, ids=lambda path: path.stem)
def test_tokenizer_yaml_parses(path, tmp_path):
    mapping = OmegaConf.to_container(OmegaConf.load(path))
    if mapping["name"] == "pretrained":
        mapping["path"] = str(tmp_path / "tokenizer.json")
    if mapping.get("train_files"):  # they name the shared data folder by interpolation
        mapping["train_files"] = [str(tmp_path / "corpus.txt")]
    config = TOKENIZERS.parse(mapping, "tokenizer")
    expected = {"bpe": ("bpe", 8192), "byte": ("byte", 265), "pretrained": ("pretrained", None),
                "rxt_bpe": ("bpe", 5000)}
    assert (config.name, config.max_vocab_size) == expected[path.stem]


def test_extra_special_tokens_are_single_tokens_after_ours(training_texts, tmp_path):
    """[Q] [A] [MASK] (conf/tokenizer/rxt_bpe.yaml) are whole tokens that text never splits,
    listed among the special ids; a saved tokenizer keeps them."""
    extra = ["[Q]", "[A]", "[MASK]"]
    config = BPEConfig(vocab_size=600, special_tokens=extra)
    bpe = TOKENIZERS.build(config, iter(training_texts[:300]), FAKE_SHA, tmp_path)
    byte = TOKENIZERS.build(ByteConfig(special_tokens=extra))
    assert byte.vocab_size == ByteConfig(special_tokens=extra).max_vocab_size == 268
    bpe.save(tmp_path / "saved.json")
    loaded = TOKENIZERS.build(PretrainedConfig(path=str(tmp_path / "saved.json")))
    for tokenizer in (bpe, byte, loaded):
        ids = [tokenizer.token_to_id(token) for token in extra]
        assert None not in ids
        assert tokenizer.encode("[Q] a cat [A] a [MASK] dog")[0] == ids[0]
        assert ids[2] in tokenizer.encode("x[MASK]y")
        assert set(ids) | {tokenizer.pad_id, tokenizer.eos_id} <= set(tokenizer.special_ids)
        assert tokenizer.encode("a cat") and not set(tokenizer.encode("a cat")) & set(
            tokenizer.special_ids)
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    with pytest.raises(ConfigError) as error:
        TOKENIZERS.parse({"name": "byte", "special_tokens": ["[Q]", "[Q]"]}, "tokenizer")
    assert error.value.key == "tokenizer.special_tokens"


def test_tokenizer_trained_on_its_own_files_ignores_the_data(tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("the cat sat on the mat\n" * 50 + "a dog ran\n" * 50)
    config = BPEConfig(vocab_size=300, train_files=[str(corpus)])
    first = TOKENIZERS.build(config, iter(["something else entirely"] * 10), FAKE_SHA, tmp_path)
    second = TOKENIZERS.build(config, iter(["other text"] * 10), "1" * 64, tmp_path)
    assert first.sha256 == second.sha256
    assert len(first.encode("the cat sat on the mat")) < len("the cat sat on the mat") / 2
    with pytest.raises(ConfigError) as error:
        TOKENIZERS.build(BPEConfig(train_files=[str(tmp_path / "missing.txt")]), iter([]),
                         FAKE_SHA, tmp_path)
    assert error.value.key == "tokenizer.train_files"
