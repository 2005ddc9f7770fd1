"""A conversation with a Reactive Transformer: the state behind `python -m moa.chat` for
an RxT run.

Each user message is one interaction: the decoder answers `[Q] message [A]` reading the
short-term memory (moa/models/reactive/model.py: `stream`, KV-cached), and the finished
interaction `[Q] message [A] answer <|eos|>` is then written into the memory (encoder and
memory attention). Nothing else is kept: no history is re-read or dropped, so every turn
costs the same. `reset` returns to the initial memory. A reply stopped part way (the
consumer closes the stream, as on Ctrl-C) is written into the memory as far as it got.

The same methods as `Conversation` (moa/training/conversation.py): `stream(text)` yields
the reply's text piece by piece, `reply(text) -> str` returns it whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from moa.data.tokenizer import Tokenizer
from moa.errors import ConfigError
from moa.models.generation import SamplingConfig
from moa.models.reactive import ReactiveTransformer
from moa.training.conversation import text_pieces

QUERY, ANSWER = "[Q]", "[A]"


class ReactiveConversation:
    def __init__(self, model: ReactiveTransformer, tokenizer: Tokenizer,
                 sampling: SamplingConfig, system: str | None = None,
                 notice: Callable[[str], None] = print,
                 generator: torch.Generator | None = None) -> None:
        ids = {token: tokenizer.token_to_id(token) for token in (QUERY, ANSWER)}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ConfigError("run_dir", f"a tokenizer without {missing}",
                              f"an RxT run whose tokenizer has {QUERY} and {ANSWER}")
        # The run's tokenizer says which ids end an answer and pad a finished row.
        model.config = dataclasses.replace(model.config, query_id=ids[QUERY],
                                           answer_id=ids[ANSWER], end_id=tokenizer.eos_id,
                                           pad_id=tokenizer.pad_id)
        self.model, self.tokenizer, self.sampling = model.eval(), tokenizer, sampling
        self.notice, self.generator = notice, generator
        self.system = system
        self.memory = self._initial_memory()

    @property
    def system(self) -> None:
        return None

    @system.setter
    def system(self, text: str | None) -> None:
        if text:
            self.notice("[a Reactive Transformer has no system message: ignored]")

    def _initial_memory(self) -> torch.Tensor:
        weight = self.model.embedding.weight
        return self.model.initial_memory(1, weight.device, weight.dtype)

    def reset(self) -> None:
        self.memory = self._initial_memory()

    def set_temperature(self, temperature: float) -> None:
        self.sampling = dataclasses.replace(self.sampling, temperature=temperature)

    def query_ids(self, text: str) -> list[int]:
        """`[Q] text [A]`, the text's last tokens where the interaction (with the answer's
        max_new_tokens and its end) would not fit the model's message length."""
        config = self.model.config
        room = config.max_seq_len - self.sampling.max_new_tokens - 3
        ids = self.tokenizer.encode(" " + text)
        if len(ids) > room:
            self.notice(f"[the message is {len(ids)} tokens: only its last {room} are read]")
            ids = ids[len(ids) - room:]
        return [config.query_id, *ids, config.answer_id]

    def stream(self, text: str) -> Iterator[str]:
        """The reply to `text`, piece by piece as it is written; then the interaction is
        written into the memory."""
        device = self.model.embedding.weight.device
        query = torch.tensor([self.query_ids(text)], device=device)
        new: list[int] = []
        try:
            yield from text_pieces(self.model.stream(query, self.memory,
                                                     self.sampling.max_new_tokens,
                                                     self.sampling, self.generator),
                                   self.tokenizer, new)
        finally:
            self._remember(query, new)

    def reply(self, text: str) -> str:
        return "".join(self.stream(text))

    @torch.no_grad()
    def _remember(self, query: torch.Tensor, answer: list[int]) -> None:
        ended = torch.tensor([[*answer, self.tokenizer.eos_id]], device=query.device)
        interaction = torch.cat([query, ended], dim=1)
        encoded = self.model.encode(interaction, memory=self.memory)
        self.memory = self.model.update_memory(self.memory, encoded.layers)
