"""python -m moa.chat (moa/chat.py) and its Conversation (moa/training/conversation.py)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

import moa.training.conversation as conversation_module
from moa.chat import chat, load_config, open_conversation
from moa.data.chat_template import render
from moa.errors import ConfigError
from moa.models.generation import SamplingConfig, generate
from tests.conftest import ROOT, train_run

RUN = ("trainer=smoke", "model=gpt", "tokenizer=byte", "model.n_layers=1", "data.batch_size=8",
       "trainer.max_steps=4", "trainer.val_check_interval=4", "evaluate=false",
       "sampling.prompts=[]")
GREEDY = ("sampling.temperature=0", "sampling.max_new_tokens=12")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    return train_run(tmp_path_factory.mktemp("chat") / "run", cache_dir, *RUN)


def greedy_reply(conversation, messages) -> str:
    """The reply by plain greedy decoding of the rendered conversation, up to <|eos|>."""
    tokenizer = conversation.tokenizer
    ids = torch.tensor([tokenizer.encode(render(messages, add_generation_prompt=True))])
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12, use_cache=False)
    new = generate(conversation.model, ids, sampling, stop_token=tokenizer.eos_id)[0, ids.size(1):]
    new = new.tolist()
    return tokenizer.decode(new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new)


def run_chat(directory, lines: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moa.chat", f"run_dir={directory}", *arguments],
                          input=lines, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_piped_lines_are_turns_and_replies_are_the_models_greedy_text(run_dir, tmp_path,
                                                                     compose_config):
    conversation = open_conversation(load_config([f"run_dir={run_dir}", *GREEDY]))
    first = greedy_reply(conversation, [{"role": "user", "content": "Hi"}])
    second = greedy_reply(conversation, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"}])
    lines = "Hi\n/reset\n/system Be brief.\nHi\n/quit\nnever answered\n"
    result = run_chat(run_dir, lines, *GREEDY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == f"{first}\n{second}\n"
    assert "[conversation reset]" in result.stderr

    pytest.importorskip("transformers")
    from moa.hf.export import export

    out = export(compose_config(f"run_dir={run_dir}", f"out={tmp_path / 'exported'}",
                                config_name="export"))
    assert run_chat(out, lines, *GREEDY).stdout == result.stdout  # an exported directory too


def test_the_reply_streams_and_a_second_turn_sees_the_first(run_dir):
    conversation = open_conversation(load_config([f"run_dir={run_dir}", *GREEDY]))
    pieces = list(conversation.stream("Hello there"))
    assert len(pieces) > 1 and "".join(pieces) == conversation.turns[-1]["content"]
    expected = greedy_reply(conversation, [*conversation.messages,
                                           {"role": "user", "content": "And?"}])
    assert conversation.reply("And?") == expected


def test_the_oldest_turns_are_dropped_to_fit_the_context_with_a_notice(run_dir):
    notices = []
    conversation = open_conversation(load_config([f"run_dir={run_dir}", *GREEDY,
                                                  "system=Sys"]), notice=notices.append)
    room = conversation.model.config.max_seq_len - 12  # tiny: 64 - 12
    for turn in range(4):
        conversation.reply(f"turn {turn}: " + "x" * 10)
        assert len(conversation.prompt_ids()) <= room
    assert any("dropped" in notice for notice in notices)
    assert conversation.messages[0] == {"role": "system", "content": "Sys"}
    assert conversation.turns[0]["role"] == "user"
    assert "turn 0" not in render(conversation.messages)


def test_ctrl_c_stops_the_reply_not_the_chat(run_dir, monkeypatch):
    conversation = open_conversation(load_config([f"run_dir={run_dir}", *GREEDY]))
    real_stream = conversation_module.stream

    def interrupted(*args, **kwargs):
        for step, token in enumerate(real_stream(*args, **kwargs)):
            if step == 2:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr(conversation_module, "stream", interrupted)
    out, err = io.StringIO(), io.StringIO()
    chat(conversation, ["Hi", "/temp 0.5", "/temp hot", "/nope"], out, err)
    assert "[stopped]" in err.getvalue()
    partial = conversation.turns[1]["content"]
    assert out.getvalue() == partial + "\n"
    assert len(conversation.tokenizer.encode(partial)) == 2  # the two tokens before Ctrl-C
    assert conversation.sampling.temperature == 0.5
    assert "/temp takes a number" in err.getvalue() and "unknown command '/nope'" in err.getvalue()
    monkeypatch.setattr(conversation_module, "stream", real_stream)
    chat(conversation, ["Again"], out, err)  # the chat goes on after the interruption
    assert [t["role"] for t in conversation.turns] == ["user", "assistant"] * 2


def test_a_bad_option_is_one_line_and_exit_2(tmp_path):
    result = run_chat(tmp_path / "nowhere", "")
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid config run_dir=")
    with pytest.raises(ConfigError) as error:
        load_config(["temprature=0"])
    assert error.value.key == "temprature"
