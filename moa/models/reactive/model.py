"""The Reactive Transformer (RxT-Alpha, Reactive AI): one message at a time, the
conversation kept in a fixed-size short-term memory (STM).

    model = build_model(config)                              # a ReactiveConfig
    memory = model.initial_memory(batch_size)                # (n_layers, B, slots, C)
    answer, memory = model.interact(query_ids, memory, max_new_tokens=64)

A turn: the decoder writes the answer reading the STM through memory cross-attention
(`respond`: KV-cached, the STM's keys and values projected once per turn); then the
encoder reads concat(query, answer) and the memory attention writes it into the STM
(`interact`). A turn's cost depends on its own length, not on the conversation's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moa.config import ReactiveConfig
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.context import ForwardContext
from moa.layers.kv_cache import KVCache
from moa.layers.mlm_head import MaskedLMHead
from moa.layers.position import POSITION
from moa.layers.residual import Dropout
from moa.models.generation import SamplingConfig, decoding_step, next_token
from moa.models.language_model import init_weights
from moa.models.reactive.memory import MemoryAttention
from moa.models.reactive.stack import Decoder, Encoder
from moa.models.registry import register_model


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, L, C) after the final norm: the MLM head's input
    layers: torch.Tensor  # (n_layers, B, L, C) each layer's output: what the memory stores


@register_model("reactive")
class ReactiveTransformer(nn.Module):
    def __init__(self, config: ReactiveConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size must be set (taken from the tokenizer) to build")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)  # encoder's and decoder's
        self.position = POSITION.build(config.position, config.max_seq_len, config.d_model,
                                       config.head_dim)
        self.dropout = Dropout(config.dropout)
        self.encoder = Encoder(config)
        self.mlm_head = MaskedLMHead(config.d_model, config.vocab_size)
        self.decoder = Decoder(config, self.embedding)
        self.memory_attention = MemoryAttention(config)
        self.apply(lambda module: init_weights(module, config.init_std, config.n_layers))
        self.memory_attention.reset_gates()
        # The STM every conversation starts from: near zero, fixed (a buffer, saved).
        self.register_buffer("stm_init", torch.randn(config.n_layers, 1, config.stm_slots,
                                                     config.d_model) * config.stm_init_std)

    def parameter_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """The rows of `python -m moa.params`: the shared embedding (and position encoding)
        with the encoder, as the card counts it."""
        return [("Encoder", [self.embedding, self.position, self.encoder]),
                ("MLM head", [self.mlm_head]), ("Decoder", [self.decoder]),
                ("Memory attention", [self.memory_attention])]

    def encoder_only(self) -> ReactiveTransformer:
        """This model without its decoder and memory attention, in place: the encoder and
        the MLM head alone (`encode`, `mlm_logits`), as a fill-mask export holds them."""
        del self.decoder, self.memory_attention
        return self

    def initial_memory(self, batch_size: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """The STM a conversation starts from: (n_layers, B, slots, C), the same per row."""
        memory = self.stm_init.expand(-1, batch_size, -1, -1)
        return memory.to(device=device, dtype=dtype).clone()

    def _context(self, start: int, length: int, device: torch.device, causal: bool,
                 key_mask: torch.Tensor | None = None) -> ForwardContext:
        if start + length > self.config.max_seq_len:
            raise ValueError(f"a message of {start + length} tokens exceeds model.max_seq_len="
                             f"{self.config.max_seq_len}")
        return ForwardContext(positions=torch.arange(start, start + length, device=device),
                              position=self.position, record=AuxiliaryRecorder(),
                              causal=causal, key_mask=key_mask)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.position.embed(self.embedding(ids), positions))

    def encode(self, ids: torch.Tensor, pad_mask: torch.Tensor | None = None,
               memory: torch.Tensor | None = None) -> EncoderOutput:
        """ids (B, L), pad_mask (B, L) True = real token; bidirectional. Where the encoder
        reads the memory (`model.encoder_reads_memory`), it reads `memory` (n_layers, B,
        slots, C), by default the initial STM (as in joint pre-training)."""
        ctx = self._context(0, ids.size(1), ids.device, causal=False, key_mask=pad_mask)
        if self.config.encoder_reads_memory and memory is None:
            memory = self.initial_memory(ids.size(0), ids.device, self.embedding.weight.dtype)
        with self.position.one_forward():  # the layers share its tables
            layers = self.encoder.layers(self._embed(ids, ctx.positions), ctx, memory, None)
        return EncoderOutput(self.encoder.norm(layers[-1]), torch.stack(layers))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The encoder's hidden (B, L, C) -> MLM logits (B, L, V)."""
        return self.mlm_head(hidden)

    def decode(self, ids: torch.Tensor, memory: torch.Tensor,
               memory_mask: torch.Tensor | None = None, cache: KVCache | None = None
               ) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V): causal self-attention, cross-attention into
        memory (n_layers, B, M, C) (the STM, or in joint pre-training the encoder's detached
        layer outputs, memory_mask (B, M) True = real), FFN. With a cache (`new_cache`) the
        tokens continue it, and the memory's keys and values are those of its first call."""
        start = cache.length if cache is not None else 0
        ctx = self._context(start, ids.size(1), ids.device, causal=True)
        with self.position.one_forward():  # the layers share its tables
            layers = self.decoder.layers(self._embed(ids, ctx.positions), ctx, memory,
                                         memory_mask, cache)
        logits = self.decoder.lm_head(self.decoder.norm(layers[-1]), ctx.scoped("head"))
        if cache is not None:
            cache.length += ids.size(1)
        return logits

    def update_memory(self, memory: torch.Tensor, encoded_layers: torch.Tensor,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The gated write (moa/models/reactive/memory.py): memory (n_layers, B, slots, C),
        encoded_layers (n_layers, B, L, C), pad_mask (B, L) -> the new memory."""
        return self.memory_attention(memory, encoded_layers, pad_mask)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, capacity or self.config.max_seq_len)

    @torch.no_grad()
    def respond(self, query_ids: torch.Tensor, memory: torch.Tensor, max_new_tokens: int,
                sampling: SamplingConfig | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The answer to query_ids (B, Lq), the decoder's prompt as it was trained on it
        (e.g. `[Q] query [A]`), reading memory (n_layers, B, slots, C): (B, N) ids, N <=
        max_new_tokens, greedy unless `sampling` says otherwise. A row stops after
        `model.end_id` (kept) and is padded with `model.pad_id` after it."""
        return torch.cat(list(self.stream(query_ids, memory, max_new_tokens, sampling,
                                          generator)), dim=1)

    @torch.no_grad()
    def stream(self, query_ids: torch.Tensor, memory: torch.Tensor, max_new_tokens: int,
               sampling: SamplingConfig | None = None,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """`respond`'s tokens (B, 1), each as soon as it is chosen (a chat prints it); the
        steps after the query's prefill through `decoding_step` with `sampling.compile`."""
        sampling = sampling or SamplingConfig(temperature=0.0)
        B, prompt = query_ids.shape
        cache = self.new_cache(capacity=prompt + max_new_tokens)
        decode = decoding_step(self, self.decode) if sampling.compile else self.decode
        logits = self.decode(query_ids, memory, cache=cache)[:, -1]  # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=query_ids.device)
        for step in range(max_new_tokens):
            token = next_token(logits, sampling, generator)  # (B, 1)
            token = token.masked_fill(done[:, None], self.config.pad_id)
            yield token
            if self.config.end_id is not None:
                done |= token[:, 0] == self.config.end_id
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            logits = decode(token, memory, cache=cache)[:, -1]

    def answer_mask(self, answer_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) True for the tokens `respond` wrote, up to and with each row's end."""
        if self.config.end_id is None:
            return torch.ones_like(answer_ids, dtype=torch.bool)
        ended = (answer_ids == self.config.end_id).long().cumsum(1)
        return (ended == 0) | ((ended == 1) & (answer_ids == self.config.end_id))

    @torch.no_grad()
    def interact(self, query_ids: torch.Tensor, memory: torch.Tensor, max_new_tokens: int,
                 sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One turn: (answer ids (B, N), the new memory). The answer is `respond`'s; then
        the encoder reads concat(query, answer) (padding after each row's end masked) and
        the memory attention writes it into the memory."""
        answer = self.respond(query_ids, memory, max_new_tokens, sampling, generator)
        interaction = torch.cat([query_ids, answer], dim=1)
        pad_mask = torch.cat([torch.ones_like(query_ids, dtype=torch.bool),
                              self.answer_mask(answer)], dim=1)
        encoded = self.encode(interaction, pad_mask, memory)
        return answer, self.update_memory(memory, encoded.layers, pad_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
