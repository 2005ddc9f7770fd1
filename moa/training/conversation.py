"""A conversation with a trained model: the state behind `python -m moa.chat`.

`Conversation.stream(text)` adds a user turn and yields the reply's text piece by piece
as the model writes it (moa.models.generation.stream: KV-cache decoding; `reply(text)`
returns it whole), rendered with the chat template the model was fine-tuned on
(moa/data/chat_template.py). The history is kept within the model's context: the oldest
turns are dropped (the system message stays) until the prompt leaves room for
`max_new_tokens`, and each drop is reported through `notice`. A reply stopped part way
(the consumer closes the generator, as on Ctrl-C) is kept as far as it got.

The chat command only calls `stream`, `reset`, `system` and `set_temperature`, so a model
with another kind of state fits in as another class with the same methods: the Reactive
Transformer's memory is moa/training/reactive_conversation.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from moa.data.chat_template import render
from moa.data.tokenizer import Tokenizer
from moa.models.generation import SamplingConfig, stream
from moa.models.language_model import LanguageModel


class Conversation:
    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, sampling: SamplingConfig,
                 system: str | None = None, notice: Callable[[str], None] = print,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.tokenizer, self.sampling = model.eval(), tokenizer, sampling
        self.system, self.notice, self.generator = system, notice, generator
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first

    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns = []

    def set_temperature(self, temperature: float) -> None:
        self.sampling = replace(self.sampling, temperature=temperature)  # validated there

    def prompt_ids(self) -> list[int]:
        """The conversation so far and the generation prompt, oldest turns dropped to fit."""
        room = self.model.config.max_seq_len - self.sampling.max_new_tokens
        ids = self.tokenizer.encode(render(self.messages, add_generation_prompt=True))
        dropped = 0
        while len(ids) > room and len(self.turns) > 1:
            self.turns.pop(0)  # the oldest turn; a reply never starts the history
            while self.turns and self.turns[0]["role"] != "user":
                self.turns.pop(0)
            dropped += 1
            ids = self.tokenizer.encode(render(self.messages, add_generation_prompt=True))
        if dropped:
            self.notice(f"[the conversation outgrew the context of {room} tokens: "
                        f"dropped the {dropped} oldest turn(s)]")
        if len(ids) > room:
            self.notice(f"[the prompt is {len(ids)} tokens: only its last {room} are read]")
        return ids

    def reply(self, text: str) -> str:
        """Add the user's `text`; the reply's text."""
        return "".join(self.stream(text))

    def stream(self, text: str) -> Iterator[str]:
        """Add the user's `text`; yield the reply's text as it is written."""
        self.turns.append({"role": "user", "content": text})
        prompt = torch.tensor([self.prompt_ids()], device=self.model.embedding.weight.device)
        new: list[int] = []
        try:
            yield from text_pieces(stream(self.model, prompt, self.sampling, self.generator,
                                          stop_token=self.tokenizer.eos_id),
                                   self.tokenizer, new)
        finally:  # a reply stopped part way stays in the history as far as it got
            self.turns.append({"role": "assistant", "content": self.tokenizer.decode(new)})


def text_pieces(tokens: Iterator[torch.Tensor], tokenizer: Tokenizer, new: list[int]
                ) -> Iterator[str]:
    """The text of `tokens` ((1, 1) each) up to the tokenizer's end, piece by piece as whole
    characters complete; each token is appended to `new` as it comes."""
    shown = 0
    for token in tokens:
        if int(token) == tokenizer.eos_id:
            break
        new.append(int(token))
        text_so_far = tokenizer.decode(new)
        if not text_so_far.endswith("\ufffd"):  # wait for a character's last byte
            yield text_so_far[shown:]
            shown = len(text_so_far)
    if tokenizer.decode(new)[shown:]:
        yield tokenizer.decode(new)[shown:]
