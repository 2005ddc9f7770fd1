"""data=dialogue_recall (moa/data/dialogue_recall.py): seedable, the answer never in the
current message, labels on answers only, and the three views agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moa.data import CORPORA, TOKENIZERS
from moa.data.dialogue_recall import IGNORE_INDEX, conversations
from moa.errors import ConfigError

TOKENIZER = TOKENIZERS.parse({"name": "byte", "special_tokens": ["[Q]", "[A]", "[MASK]"]})


def config(**values):
    return CORPORA.parse({"name": "dialogue_recall", "block_size": 64, "num_turns": 6,
                          "num_train_conversations": 40, "num_val_conversations": 4,
                          "num_test_conversations": 4, **values}, "data")


def test_the_same_seed_gives_the_same_conversations_and_another_seed_others(tmp_path):
    first = CORPORA.build(config(), TOKENIZER, tmp_path).datasets["train"]
    again = CORPORA.build(config(), TOKENIZER, tmp_path).datasets["train"]
    other = CORPORA.build(config(seed=7), TOKENIZER, tmp_path).datasets["train"]
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.labels, again.labels)
    assert torch.equal(first.distance, again.distance)
    assert not torch.equal(first.inputs, other.inputs)


@pytest.mark.parametrize("facts_per_turn, max_distance", [(1, None), (2, 3)])
def test_the_answer_is_never_in_the_current_message(facts_per_turn, max_distance):
    made = conversations(config(facts_per_turn=facts_per_turn, max_distance=max_distance,
                                num_turns=8), 300, np.random.default_rng(0))
    seen = set()
    for c in made:
        assert c.distances[0] == 0 and c.answers[0] == ["ok"]
        for t in range(1, len(c.queries)):
            (answer,), d = c.answers[t], c.distances[t]
            assert answer not in c.queries[t]
            assert 1 <= d <= min(t, max_distance or t)
            asked = c.queries[t][-2]  # "... what is the KEY ?"
            stated = c.queries[t - d]
            assert stated[stated.index(asked) + 2] == answer  # "the KEY is VALUE"
            seen.add(d)
    assert seen == set(range(1, (max_distance or 7) + 1))


def test_labels_are_the_answer_and_its_end_and_the_query_is_unlabelled(tmp_path):
    splits = CORPORA.build(config(), TOKENIZER, tmp_path)
    tokenizer, data = splits.tokenizer, splits.datasets["test"]
    answer_id = tokenizer.token_to_id("[A]")
    for item in data:
        for ids, labels in zip(item["input_ids"], item["labels"], strict=True):
            start = int((ids == answer_id).nonzero()) if (ids == answer_id).any() else None
            labelled = (labels != IGNORE_INDEX).nonzero().flatten()
            assert int(labelled[0]) == start  # [A] predicts the first answer token
            assert int(labels[labelled[-1]]) == tokenizer.eos_id
            query = ids[:start + 1].tolist()
            answer = labels[labelled[:-1]].tolist()
            # the answer's tokens never occur as a run inside the query
            assert not any(query[i:i + len(answer)] == answer for i in range(len(query)))


def test_views_hold_the_same_tokens(tmp_path):
    built = {view: CORPORA.build(config(view=view, block_size=400 if view == "history" else 64),
                                 TOKENIZER, tmp_path).datasets["validation"]
             for view in ("conversation", "current", "history")}
    conversation, current, history = built["conversation"], built["current"], built["history"]
    assert len(current) == 6 * len(conversation) and len(history) == len(conversation)
    for index in range(len(conversation)):
        item, whole = conversation[index], history[index]
        real = item["labels"] != IGNORE_INDEX
        assert torch.equal(item["labels"][real], whole["labels"][whole["labels"] != IGNORE_INDEX])
        assert torch.equal(item["turn"][real], whole["turn"][whole["labels"] != IGNORE_INDEX])
        for t in range(6):
            assert torch.equal(current[6 * index + t]["input_ids"], item["input_ids"][t])
            assert torch.equal(current[6 * index + t]["distance"], item["distance"])
            assert (current[6 * index + t]["turn"] == t).all()


@pytest.mark.parametrize("values, key", [
    ({"num_turns": 30}, "data.keys"),
    ({"values": ["red", "cat"] + [f"v{i}" for i in range(10)]}, "data.values"),
    ({"max_distance": 6}, "data.max_distance"),
    ({"view": "stream"}, "data.view"),
])
def test_bad_settings_name_their_key(values, key):
    with pytest.raises(ConfigError) as error:
        config(**values)
    assert error.value.key == key


def test_turns_that_do_not_fit_and_a_tokenizer_without_q_and_a_are_errors(tmp_path):
    with pytest.raises(ConfigError) as error:
        CORPORA.build(config(block_size=16), TOKENIZER, tmp_path)
    assert error.value.key == "data.block_size"
    with pytest.raises(ConfigError) as error:
        CORPORA.build(config(), TOKENIZERS.parse({"name": "byte"}), tmp_path)
    assert error.value.key == "tokenizer.special_tokens"


def test_interactions_from_files_label_the_answer_only(tmp_path, shared_data):
    """data=interactions: every user message the assistant answers is one interaction."""
    import json

    from moa.data.interactions import interaction_pairs

    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "see you"}, {"role": "user", "content": "?"}]
    assert interaction_pairs(messages) == [("hi", "hello"), ("bye", "see you")]
    records = tmp_path / "chats.jsonl"
    records.write_text("\n".join(json.dumps({"messages": messages}) for _ in range(30)))
    data = CORPORA.parse({"name": "interactions", "files": [str(records)], "block_size": 32},
                         "data")
    splits = CORPORA.build(data, TOKENIZER, tmp_path)
    tokenizer = splits.tokenizer
    item = splits.datasets["train"][0]
    ids = item["input_ids"][item["input_ids"] != tokenizer.pad_id].tolist()
    assert tokenizer.decode(ids) in ("[Q] hi[A] hello", "[Q] bye[A] see you")
    labelled = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labelled[:-1]).strip() in ("hello", "see you")
    assert labelled[-1] == tokenizer.eos_id
    alpaca = CORPORA.parse({"name": "interactions", "format": "alpaca", "block_size": 256,
                            "files": [str(shared_data / "alpaca" / "alpaca_data_1k.json")]},
                           "data")
    built = CORPORA.build(alpaca, TOKENIZER, tmp_path)
    assert sum(len(built.datasets[split]) for split in built.datasets) > 900
