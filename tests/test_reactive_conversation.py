"""Talking to a Reactive Transformer run: ReactiveConversation
(moa/training/reactive_conversation.py) and `python -m moa.chat`. The run is a tiny
randomly initialised RxT saved as training saves it (config.yaml, tokenizer.json with
[Q] and [A], checkpoints/last.ckpt)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moa.chat import load_config, open_conversation
from moa.data.tokenizer import Tokenizer
from moa.training.reactive_conversation import ReactiveConversation
from tests.conftest import ROOT

GREEDY = ("sampling.temperature=0", "sampling.max_new_tokens=6")


def expected_reply(conversation: ReactiveConversation, text: str,
                   memory: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The greedy answer to `[Q] text [A]` from `memory`, and the memory after the turn."""
    model, tokenizer = conversation.model, conversation.tokenizer
    query = torch.tensor([conversation.query_ids(text)])
    answer = model.respond(query, memory, max_new_tokens=6)[0].tolist()
    if tokenizer.eos_id in answer:
        answer = answer[:answer.index(tokenizer.eos_id)]
    interaction = torch.tensor([[*query[0].tolist(), *answer, tokenizer.eos_id]])
    after = model.update_memory(memory, model.encode(interaction, memory=memory).layers)
    return tokenizer.decode(answer), after


def test_each_reply_reads_the_memory_and_writes_the_interaction(rxt_run):
    conversation = open_conversation(load_config([f"run_dir={rxt_run}", *GREEDY]))
    assert isinstance(conversation, ReactiveConversation)
    tokenizer = conversation.tokenizer
    assert conversation.query_ids("hello")[0] == tokenizer.token_to_id("[Q]")
    assert conversation.model.config.end_id == tokenizer.eos_id
    start = conversation.memory.clone()
    first, after_first = expected_reply(conversation, "hello there", start)
    assert conversation.reply("hello there") == first and first  # a non-empty reply
    torch.testing.assert_close(conversation.memory, after_first)
    second, after_second = expected_reply(conversation, "what is my name", after_first)
    assert "".join(conversation.stream("what is my name")) == second
    torch.testing.assert_close(conversation.memory, after_second)
    assert not torch.allclose(after_second, start)
    conversation.reset()
    assert torch.equal(conversation.memory, start)


def test_chat_command_talks_to_an_rxt_run_and_reset_clears_the_memory(rxt_run):
    conversation = open_conversation(load_config([f"run_dir={rxt_run}", *GREEDY]))
    first = conversation.reply("hello there")
    second = conversation.reply("who are you")
    result = subprocess.run(
        [sys.executable, "-m", "moa.chat", f"run_dir={rxt_run}", *GREEDY],
        input="hello there\nwho are you\n/reset\nhello there\n", cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == f"{first}\n{second}\n{first}\n"
    assert "[conversation reset]" in result.stderr


def test_a_tokenizer_without_the_interaction_tokens_is_refused(rxt_run):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    plain = Tokenizer(Backend(WordLevel({"<|unk|>": 0, "hi": 1}, unk_token="<|unk|>")))
    plain.save(rxt_run / "tokenizer.json")
    from moa.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[Q\]"):
        open_conversation(load_config([f"run_dir={rxt_run}", *GREEDY]))
