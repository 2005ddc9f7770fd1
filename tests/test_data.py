"""Text corpora, split carving, packing and the DataModule, on the shared real data."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from moa.data import CORPORA, LMDataModule, build_datamodule
from moa.data.corpora import load_hf, load_pydocs, load_text_files
from moa.data.packing import BlockDataset
from moa.data.pydocs import pydocs_documents, pydocs_file
from moa.data.tokenizer import ByteConfig
from moa.errors import ConfigError
from tests.conftest import CONF_DIR

BYTE = {"name": "byte"}


def data_yaml(name: str, shared_data: Path, **overrides) -> dict:
    """conf/data/<name>.yaml as Hydra composes it: its defaults list, then interpolations."""
    node = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
    merged = OmegaConf.create()
    for entry in node.pop("defaults", ["_self_"]):
        merged.merge_with(node if entry == "_self_" else data_yaml(entry, shared_data))
    root = OmegaConf.create({"model": {"max_seq_len": 64}, "seed": 7,
                             "paths": {"shared_data_dir": str(shared_data)}})
    root.data = OmegaConf.merge(merged, overrides)
    return OmegaConf.to_container(root.data, resolve=True)


def datamodule(data: dict, tmp_path: Path, tokenizer: dict | None = BYTE, seed: int = 0):
    module = build_datamodule(data, tokenizer, seed, tmp_path / "cache")
    module.prepare_data()
    module.setup("fit")
    return module


def texts(dataset: datasets.Dataset) -> list[str]:
    return list(dataset["text"])


@pytest.fixture(scope="module")
def pydocs_cache(tmp_path_factory) -> Path:
    """One cache for the tests that build the full pydocs corpus (a few seconds)."""
    return tmp_path_factory.mktemp("pydocs-cache")


@pytest.fixture(scope="module")
def stories(shared_data) -> list[str]:
    raw = (shared_data / "tinystories" / "TinyStories-train.first2MiB.txt").read_text()
    return [story.strip() for story in raw.split("<|endoftext|>")[:400] if story.strip()]


# --- YAML presets ------------------------------------------------------------------------

REQUIRED = {"text_files": {"train_files": "x.txt"}, "hf": {"path": "some/dataset"},
            "chat": {"files": ["conversations.jsonl"]},
            "interactions": {"files": ["conversations.jsonl"]}}


@pytest.mark.parametrize("path", sorted((CONF_DIR / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_data_yaml_parses(path, shared_data):
    config = CORPORA.parse(data_yaml(path.stem, shared_data, **REQUIRED.get(path.stem, {})), "data")
    # the synthetic tasks size their own examples; text blocks follow the model's context
    own = {"mqar": getattr(config, "seq_len", None), "dialogue_recall": 32}
    assert config.block_size == own.get(config.name, 64)
    if config.name == "text_files" and path.stem != "text_files":
        assert all(Path(file).is_file() for file in config.train_files)


def test_hf_presets_inherit_from_hf(shared_data):
    wikitext = CORPORA.parse(data_yaml("wikitext103", shared_data), "data")
    assert (wikitext.name, wikitext.path, wikitext.subset) == \
        ("hf", "Salesforce/wikitext", "wikitext-103-raw-v1")
    assert (wikitext.train_split, wikitext.val_split, wikitext.test_split) == \
        ("train", "validation", "test")
    stories = CORPORA.parse(data_yaml("tinystories", shared_data), "data")
    assert stories.test_split is None and stories.text_field == "text"


# --- pydocs ------------------------------------------------------------------------------


def test_pydocs_extraction_is_deterministic_and_uses_no_tests():
    json_package = Path(sysconfig.get_paths()["stdlib"]) / "json"
    first = list(pydocs_documents(json_package))
    assert first == list(pydocs_documents(json_package))
    modules = "\n".join(first)
    assert "decoder.JSONDecoder.decode\n\n" in modules  # qualified names head the docstrings
    assert "tests" not in {line.split(".")[0] for line in modules.splitlines()}
    assert any(doc.startswith('The "assert" statement') for doc in first)  # pydoc topics


def test_pydocs_corpus_is_cached_and_hashed(pydocs_cache):
    path = pydocs_file(pydocs_cache)
    built = path.read_bytes()
    text = [json.loads(line)["text"] for line in built.decode().splitlines()]
    assert 1_500_000 < sum(map(len, text)) < 3_000_000  # about 2 MB of English docs
    assert not any(doc.startswith(("test.", "idlelib.", "lib2to3.")) for doc in text)
    first = load_pydocs(CORPORA.parse({"name": "pydocs"}), pydocs_cache)
    second = load_pydocs(CORPORA.parse({"name": "pydocs"}), pydocs_cache)
    assert pydocs_file(pydocs_cache).read_bytes() == built and first.sha256 == second.sha256
    assert sum(len(first.splits[split]) for split in first.splits) == len(text)


@pytest.mark.slow
def test_pydocs_rebuild_is_identical(tmp_path):
    assert pydocs_file(tmp_path / "a").read_bytes() == pydocs_file(tmp_path / "b").read_bytes()


# --- text_files and hf loaders -----------------------------------------------------------


def test_shakespeare_paragraphs_carve_disjoint_deterministic_splits(shared_data, tmp_path):
    config = CORPORA.parse(data_yaml("shakespeare", shared_data), "data")
    corpus = load_text_files(config, tmp_path)
    paragraphs = (shared_data / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    sizes = {split: len(corpus.splits[split]) for split in corpus.splits}
    assert sum(sizes.values()) == len([p for p in paragraphs if p.strip()])
    assert sizes["validation"] == sizes["test"] == int(0.05 * sum(sizes.values()))
    assert corpus.splits["train"][0]["text"].startswith("First Citizen:")
    assert not set(texts(corpus.splits["validation"])) & set(texts(corpus.splits["test"]))
    again = load_text_files(config, tmp_path)
    assert again.sha256 == corpus.sha256
    assert texts(again.splits["test"]) == texts(corpus.splits["test"])
    reseeded = load_text_files(CORPORA.parse(data_yaml("shakespeare", shared_data, seed=8)),
                               tmp_path)
    assert texts(reseeded.splits["test"]) != texts(corpus.splits["test"])
    assert reseeded.sha256 != corpus.sha256


def test_wikitext2_uses_its_own_validation_and_test_files(shared_data, tmp_path):
    corpus = load_text_files(CORPORA.parse(data_yaml("wikitext2_local", shared_data)), tmp_path)
    valid = (shared_data / "wikitext-2" / "valid.txt").read_text().splitlines()
    assert texts(corpus.splits["validation"]) == [line for line in valid if line.strip()]
    assert corpus.splits["train"][0]["text"] == " = Valkyria Chronicles III = "


def test_tinystories_local_has_one_story_a_document(shared_data, tmp_path, stories):
    corpus = load_text_files(CORPORA.parse(data_yaml("tinystories_local", shared_data)), tmp_path)
    documents = [text for split in ("train", "validation", "test")
                 for text in texts(corpus.splits[split])]
    raw = (shared_data / "tinystories" / "TinyStories-train.first2MiB.txt").read_text()
    assert len(documents) == len([s for s in raw.split("<|endoftext|>") if s.strip()])
    assert not any("<|endoftext|>" in text for text in documents)
    assert set(stories[:50]) <= set(documents)


def test_alpaca_json_reads_the_text_field(shared_data, tmp_path):
    config = CORPORA.parse({"name": "text_files", "text_field": "output",
                            "train_files": str(shared_data / "alpaca" / "alpaca_data_1k.json")})
    corpus = load_text_files(config, tmp_path)
    records = json.loads((shared_data / "alpaca" / "alpaca_data_1k.json").read_text())
    outputs = {record["output"] for record in records}
    assert sum(len(split) for split in corpus.splits.values()) == 1000
    assert set(texts(corpus.splits["train"])) <= outputs


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
def test_structured_files_made_from_real_stories(stories, tmp_path, suffix):
    table = datasets.Dataset.from_dict({"story": stories, "n": list(range(len(stories)))})
    train, valid = tmp_path / f"train.{suffix}", tmp_path / f"valid.{suffix}"
    write = {"jsonl": "to_json", "parquet": "to_parquet", "csv": "to_csv"}[suffix]
    getattr(table.select(range(300)), write)(str(train))
    getattr(table.select(range(300, len(stories))), write)(str(valid))
    config = CORPORA.parse({"name": "text_files", "train_files": [str(train)],
                            "val_files": str(valid), "text_field": "story"})
    corpus = load_text_files(config, tmp_path / "cache")
    assert texts(corpus.splits["validation"]) == stories[300:]
    assert sorted(texts(corpus.splits["train"]) + texts(corpus.splits["test"])) == \
        sorted(stories[:300])


def test_hf_loader_on_a_local_folder(stories, tmp_path):
    folder = tmp_path / "stories"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": stories[:350]}).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_dict({"text": stories[350:]}).to_parquet(str(folder / "test.parquet"))
    config = CORPORA.parse({"name": "hf", "path": str(folder), "test_split": "test"}, "data")
    corpus = load_hf(config, tmp_path / "cache")
    assert texts(corpus.splits["test"]) == stories[350:]
    assert len(corpus.splits["validation"]) == int(0.05 * 350)
    missing = CORPORA.parse({"name": "hf", "path": str(folder), "val_split": "dev"}, "data")
    with pytest.raises(ConfigError, match="train | test") as error:
        load_hf(missing, tmp_path / "cache")
    assert error.value.key == "data.val_split"


def test_unreachable_hub_dataset_is_a_config_error(tmp_path):
    config = CORPORA.parse(data_yaml("tinystories", Path("/unused")), "data")
    with pytest.raises(ConfigError) as error:  # the tests run with HF_DATASETS_OFFLINE=1
        load_hf(config, tmp_path)
    assert error.value.key == "data.path" and "roneneldan/TinyStories" in str(error.value)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("data", "key", "says"), [
    ({"train_files": "/no/such/*.txt"}, "data.train_files", "no such file"),
    ({"train_files": "{tmp}/x.txt", "val_files": "/no/such.txt"}, "data.val_files", "no such file"),
    ({"train_files": "{tmp}/blank.txt"}, "data.train_files", "no non-empty text"),
    ({"train_files": "{tmp}/two.txt"}, "data.train_files", "sample_by=paragraph"),
    ({"train_files": "{tmp}/x.dat"}, "data.format", "cannot tell"),
    ({"train_files": "{tmp}/x.jsonl", "text_field": "body"}, "data.text_field", "text"),
    ({"train_files": "{tmp}/x.txt", "block_size": 5000}, "data.block_size", "tokens"),
    ({"train_files": "{tmp}/x.txt", "batch_size": 1000}, "data.batch_size", "blocks"),
    ({"train_files": "{tmp}/latin1.txt"}, "data.train_files", "not UTF-8"),
])
def test_bad_text_data_is_a_config_error_naming_its_key(tmp_path, data, key, says):
    write(tmp_path / "x.txt", "\n\n".join(f"paragraph {i} " * 20 for i in range(60)))
    write(tmp_path / "x.dat", "data")
    write(tmp_path / "x.jsonl", '{"text": "hello"}\n')
    write(tmp_path / "blank.txt", "\n  \n\n\t\n")
    write(tmp_path / "two.txt", "one document\n\nand another")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n\n".encode("latin-1") * 50)
    mapping = {"name": "text_files", "block_size": 64, "batch_size": 4,
               **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in data.items()}}
    with pytest.raises(ConfigError) as error:
        datamodule(mapping, tmp_path)
    assert error.value.key == key and says in str(error.value)


def test_text_corpus_needs_a_tokenizer(tmp_path):
    with pytest.raises(ConfigError) as error:
        build_datamodule({"name": "pydocs"}, None, 0, tmp_path)
    assert error.value.key == "tokenizer"


# --- packing and the DataModule ----------------------------------------------------------


def test_blocks_are_consecutive_windows_with_shifted_labels():
    tokens = np.arange(1000, 1103, dtype=np.int32)
    blocks = BlockDataset(tokens, 10)
    assert len(blocks) == 10  # 103 tokens: 10 full windows of 10 inputs + 1
    for index in range(len(blocks)):
        item = blocks[index]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (10,)
        assert item["input_ids"].tolist() == tokens[10 * index : 10 * index + 10].tolist()
        assert item["labels"].tolist() == tokens[10 * index + 1 : 10 * index + 11].tolist()
    with pytest.raises(IndexError):
        blocks[10]


def test_packing_joins_documents_with_eos(shared_data, tmp_path):
    data = data_yaml("shakespeare", shared_data, block_size=128)
    module = datamodule(data, tmp_path)
    train = module.splits.datasets["train"]
    corpus = load_text_files(CORPORA.parse(data, "data"), tmp_path / "cache")
    tokenizer = module.tokenizer
    packed = tokenizer.decode(np.asarray(train.tokens).tolist())
    assert packed == "".join(doc + "<|eos|>" for doc in texts(corpus.splits["train"]))
    eos_extra_bytes = (len("<|eos|>") - 1) * len(corpus.splits["train"])  # one token each
    assert module.fingerprint["tokens"]["train"] == len(packed.encode()) - eos_extra_bytes
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (32, 128)
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()


def test_same_seeds_give_the_same_splits_and_batches(shared_data, tmp_path):
    data = data_yaml("shakespeare", shared_data, block_size=64, batch_size=8)
    first = datamodule(data, tmp_path / "a", seed=1)
    again = datamodule(data, tmp_path / "b", seed=1)
    assert first.fingerprint == again.fingerprint
    batch = next(iter(first.train_dataloader()))
    assert torch.equal(batch["input_ids"], next(iter(again.train_dataloader()))["input_ids"])
    other_order = datamodule(data, tmp_path / "a", seed=2)
    assert other_order.fingerprint == first.fingerprint
    reordered = next(iter(other_order.train_dataloader()))["input_ids"]
    assert not torch.equal(batch["input_ids"], reordered)
    other_split = datamodule({**data, "seed": 99}, tmp_path / "a", seed=1)
    assert other_split.fingerprint["corpus_sha256"] != first.fingerprint["corpus_sha256"]
    val = next(iter(first.val_dataloader()))["input_ids"]
    assert torch.equal(val, torch.stack([first.splits.datasets["validation"][i]["input_ids"]
                                         for i in range(8)]))


def test_default_datamodule_pydocs_with_bpe(pydocs_cache, tmp_path):
    """The full default pipeline: pydocs + an 8192-token BPE, then cached and reloaded."""
    data = {"name": "pydocs", "block_size": 128, "batch_size": 16, "eval_batch_size": 4}
    module = datamodule(data, pydocs_cache, tokenizer={"name": "bpe"})
    fingerprint = module.fingerprint
    assert set(fingerprint) >= {"corpus", "corpus_sha256", "tokenizer_sha256", "tokens", "blocks"}
    assert fingerprint["corpus"] == "pydocs" and len(fingerprint["corpus_sha256"]) == 64
    assert fingerprint["tokenizer_sha256"] == module.tokenizer.sha256
    assert 300_000 < sum(fingerprint["tokens"].values()) < 1_000_000
    assert module.vocab_size == module.tokenizer.vocab_size <= 8192
    for split in ("train", "validation", "test"):
        assert fingerprint["blocks"][split] == (fingerprint["tokens"][split] - 1) // 128
    assert next(iter(module.val_dataloader()))["input_ids"].shape == (4, 128)
    assert len(module.train_dataloader()) == fingerprint["blocks"]["train"] // 16

    # Eval reuses the run's saved tokenizer and gets the same tokens from the cache.
    module.tokenizer.save(tmp_path / "run" / "tokenizer.json")
    reloaded = datamodule(data, pydocs_cache, tokenizer={
        "name": "pretrained", "path": str(tmp_path / "run" / "tokenizer.json")})
    assert reloaded.fingerprint == fingerprint
    assert torch.equal(next(iter(reloaded.train_dataloader()))["input_ids"],
                       next(iter(module.train_dataloader()))["input_ids"])


def test_datamodule_properties_need_setup(tmp_path):
    module = LMDataModule(CORPORA.parse({"name": "pydocs"}), ByteConfig(), 0, tmp_path)
    with pytest.raises(RuntimeError, match="setup"):
        _ = module.vocab_size


def test_cache_writers_at_once_each_finish_and_leave_no_temporary(tmp_path):
    """Jobs of a sweep that build the same cache file at once: each writes its own
    temporary and renames it into place (a shared temporary name lost one of them)."""
    from moa.data.cache_file import written_atomically

    path = tmp_path / "cache" / "tokens.npy"
    with written_atomically(path) as first, written_atomically(path) as second:
        assert first != second
        np.save(first, np.arange(3))
        np.save(second, np.arange(3))
    assert np.load(path).tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError), written_atomically(path) as failed:
        failed.write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in path.parent.iterdir()] == ["tokens.npy"]
    assert np.load(path).tolist() == [0, 1, 2]
