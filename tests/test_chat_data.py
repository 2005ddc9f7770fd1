"""data=chat (moa/data/chat.py): the training text is the exported tokenizer's chat template,
labels are the assistant's tokens only, one conversation per padded row, bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moa.data import CORPORA, ByteConfig, PretrainedConfig
from moa.data.chat import IGNORE_INDEX, ChatConfig, encode_conversation, examples
from moa.data.chat_template import render
from moa.data.tokenizer import build_byte
from moa.errors import ConfigError
from moa.models.language_model import build_model
from tests.conftest import tiny_model_config

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "think", "content": "add"}, {"role": "reasoning", "content": "2+2=4"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Arithmetic, ünïcode ✓."}],
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def many_conversations(n: int = 40) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(n)]


def test_training_ids_equal_the_exported_tokenizers_chat_template(tmp_path, shared_data):
    pytest.importorskip("transformers")
    from moa.hf.tokenizer import hf_tokenizer

    files = str(shared_data / "alpaca" / "alpaca_data_1k.json")
    splits = CORPORA.build(ChatConfig(files=files, format="alpaca", block_size=512),
                           ByteConfig(), tmp_path)
    splits.tokenizer.save(tmp_path / "tokenizer.json")
    exported = hf_tokenizer(tmp_path / "tokenizer.json")
    alpaca = json.loads(Path(files).read_text())[:3]
    alpaca_conversations = [[{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"
                              if r["input"] else r["instruction"]},
                             {"role": "assistant", "content": r["output"]}] for r in alpaca]
    for messages in CONVERSATIONS + alpaca_conversations:
        text = exported.apply_chat_template(messages, tokenize=False)
        assert render(messages) == text
        ids, _ = encode_conversation(splits.tokenizer, messages)
        expected = exported.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert ids.tolist() == list(expected)
        prompt = exported.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        assert render(messages, add_generation_prompt=True) == prompt


def test_labels_are_the_assistant_text_think_and_reasoning_included():
    tokenizer = build_byte(ByteConfig())
    ids, written = encode_conversation(tokenizer, CONVERSATIONS[1])
    labelled = tokenizer.decode(ids[written].tolist())
    assert labelled == "<|think|>add<|reasoning|>2+2=4<|assistant|>4<|eos|>" \
                       "Arithmetic, ünïcode ✓.<|eos|>"
    ids, written = encode_conversation(tokenizer, CONVERSATIONS[0])
    assert tokenizer.decode(ids[written].tolist()) == "Hello!<|eos|>"


def test_rows_are_one_conversation_padded_and_pads_carry_no_loss():
    ids_a, written_a = torch.arange(10, 16).numpy(), torch.tensor([0, 0, 0, 1, 1, 1]).bool().numpy()
    ids_b, written_b = torch.arange(20, 24).numpy(), torch.tensor([0, 0, 1, 1]).bool().numpy()
    inputs, labels, counts = examples([(ids_a, written_a), (ids_b, written_b)], 8, 0, "truncate")
    assert inputs.tolist() == [[10, 11, 12, 13, 14, 0, 0, 0], [20, 21, 22, 0, 0, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, 13, 14, 15, -100, -100, -100],
                               [-100, 22, 23, -100, -100, -100, -100, -100]]
    assert counts == {"truncated": 0, "dropped_too_long": 0, "dropped_no_reply_in_block": 0}


def test_too_long_conversations_are_truncated_or_dropped_and_counted():
    long_ids, long_written = torch.arange(12).numpy(), (torch.arange(12) >= 3).numpy()
    late_reply = (torch.arange(12).numpy(), (torch.arange(12) >= 10).numpy())
    short = (torch.arange(4).numpy(), torch.tensor([0, 1, 1, 1]).bool().numpy())
    inputs, labels, counts = examples([(long_ids, long_written), late_reply, short], 5, 99,
                                      "truncate")
    assert counts == {"truncated": 2, "dropped_too_long": 0, "dropped_no_reply_in_block": 1}
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 99, 99]]
    assert labels[0].tolist() == [-100, -100, 3, 4, 5]
    inputs, _, counts = examples([(long_ids, long_written), late_reply, short], 5, 99, "drop")
    assert counts == {"truncated": 0, "dropped_too_long": 2, "dropped_no_reply_in_block": 0}
    assert len(inputs) == 1


def test_no_token_attends_across_a_conversation():
    """Each row's logits at its tokens equal those of its conversation run alone: the pads and
    the other rows of the batch change nothing."""
    tokenizer = build_byte(ByteConfig())
    encoded = [encode_conversation(tokenizer, m) for m in CONVERSATIONS]
    inputs, labels, _ = examples(encoded, 64, tokenizer.pad_id, "truncate")
    torch.manual_seed(0)
    model = build_model(tiny_model_config(vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():
        batch = model(torch.from_numpy(inputs)).logits
        for row, (ids, _) in enumerate(encoded):
            alone = model(torch.from_numpy(ids[:-1]).unsqueeze(0)).logits[0]
            n = len(ids) - 1
            torch.testing.assert_close(batch[row, :n], alone, rtol=1e-5, atol=1e-5)
            assert (labels[row, n:] == IGNORE_INDEX).all()


def test_alpaca_slice_builds_with_every_conversation_accounted_for(tmp_path, shared_data):
    files = str(shared_data / "alpaca" / "alpaca_data_1k.json")
    splits = CORPORA.build(ChatConfig(files=files, format="alpaca", block_size=128),
                           ByteConfig(), tmp_path)
    fingerprint = splits.fingerprint
    kept = sum(fingerprint["blocks"].values())
    dropped = sum(fingerprint["dropped_no_reply_in_block"].values())
    assert kept + dropped + fingerprint["skipped_no_assistant_turn"] == 1000
    assert sum(fingerprint["truncated"].values()) > 0  # byte tokens: many exceed 129
    first = json.loads(Path(files).read_text())
    validation = splits.datasets["validation"]
    assert len(validation) == fingerprint["blocks"]["validation"] > 0
    item = validation[0]
    text = splits.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX].tolist())
    assert "<|user|>" not in text and "<|assistant|>" not in text
    assert any(text.startswith(record["output"][:20]) for record in first)


def test_files_and_a_local_dataset_folder_give_the_same_splits(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    file = write_jsonl(folder / "train.jsonl", many_conversations())
    from_files = CORPORA.build(ChatConfig(files=str(file), block_size=64), ByteConfig(),
                               tmp_path / "cache")
    from_path = CORPORA.build(ChatConfig(path=str(folder), block_size=64), ByteConfig(),
                              tmp_path / "cache")
    for split in ("train", "validation", "test"):
        assert torch.equal(from_files.datasets[split].inputs, from_path.datasets[split].inputs)


def test_a_saved_tokenizer_is_used_as_it_is(tmp_path):
    tokenizer = build_byte(ByteConfig())
    tokenizer.save(tmp_path / "tokenizer.json")
    file = write_jsonl(tmp_path / "chat.jsonl", many_conversations())
    splits = CORPORA.build(ChatConfig(files=str(file), block_size=64),
                           PretrainedConfig(path=str(tmp_path / "tokenizer.json")), tmp_path)
    assert splits.tokenizer.sha256 == tokenizer.sha256


def test_a_malformed_jsonl_line_names_its_file_and_line(tmp_path):
    file = tmp_path / "chat.jsonl"
    file.write_text(json.dumps(many_conversations(1)[0]) + "\n\n{not json\n")
    with pytest.raises(ConfigError) as error:
        CORPORA.build(ChatConfig(files=str(file), block_size=64), ByteConfig(), tmp_path)
    assert error.value.key == "data.files"
    assert error.value.value == f"{file}:3"


def test_an_unknown_role_is_an_error_naming_it(tmp_path):
    records = many_conversations(5)
    records[2]["messages"][0]["role"] = "narrator"
    file = write_jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(ConfigError, match="unknown role 'narrator'") as error:
        CORPORA.build(ChatConfig(files=str(file), block_size=64), ByteConfig(), tmp_path)
    assert error.value.value == f"{file}:3"


def test_conversations_without_an_assistant_turn_are_skipped_and_counted(tmp_path):
    records = many_conversations(40)
    for record in records[:3]:
        record["messages"] = record["messages"][:1]
    records[3]["messages"][1]["content"] = ""
    file = write_jsonl(tmp_path / "chat.jsonl", records)
    splits = CORPORA.build(ChatConfig(files=str(file), block_size=64), ByteConfig(), tmp_path)
    assert splits.fingerprint["skipped_no_assistant_turn"] == 4
    assert sum(splits.fingerprint["blocks"].values()) == 36


@pytest.mark.parametrize("fields, key", [
    ({}, "files"),
    ({"files": "a.jsonl", "path": "some/dataset"}, "files"),
    ({"files": "a.jsonl", "format": "sharegpt"}, "format"),
    ({"files": "a.jsonl", "too_long": "wrap"}, "too_long"),
])
def test_bad_chat_config_names_its_key(fields, key):
    with pytest.raises(ConfigError) as error:
        ChatConfig(**fields)
    assert error.value.key == key
