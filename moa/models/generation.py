"""Autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moa.attention.metric import MetricAttention
from moa.models.language_model import LanguageModel
from moa.schema import check, check_range


@dataclass
class SamplingConfig:
    prompts: list[str] = field(default_factory=list)  # printed after training and by eval
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    use_cache: bool = True
    compile: bool = False  # the cached one-token step through torch.compile (`decoding_step`)

    def __post_init__(self) -> None:
        check(self.use_cache or not self.compile, "compile", self.compile,
              "false without use_cache (it compiles the cached one-token step)")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens,
              "a positive integer")
        check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 is greedy)")
        check(self.top_k is None or self.top_k > 0, "top_k", self.top_k,
              "a positive integer or null")
        if self.top_p is not None:
            check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)


def next_token(logits: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) -> (B, 1) chosen token ids."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def decoding_step(model: nn.Module, forward: Callable[..., Any] | None = None
                  ) -> Callable[..., Any]:
    """`forward` (default `model`; a decoder's method of it) compiled for the cached
    one-token steps that follow a prefill.

    The cache's length is a symbolic size (`dynamic=True`), so one graph serves every
    context; the routed sums run dense under the compiler, so the step has no host sync
    and traces whole (`fullgraph`: a break would resume in a new frame per block, each
    compiled again for every layer's scope, until torch's recompile limit). Inductor's C++
    wrapper launches the step's kernels from C++, not Python. The first call compiles (a
    minute or two on a CPU); torch caches the result on disk for the next process.
    Compiling removes most of a step's per-op Python and dispatch cost, which is most of a
    small model's step (docs/benchmarks.md).

    A model with ball pruning decodes eagerly, with a warning: its ball-aware cache holds
    a data-dependent number of keys per row, so the step's shapes change from step to
    step and torch recompiles it until its limit."""
    forward = forward or model
    if any(isinstance(module, MetricAttention) and module.balls is not None
           for module in model.modules()):
        warnings.warn("sampling.compile: a model with ball pruning decodes eagerly (its "
                      "ball-aware cache's shapes change every step)", stacklevel=2)
        return forward
    return torch.compile(forward, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})


def prompt_window(model: LanguageModel, input_ids: torch.Tensor,
                  sampling: SamplingConfig) -> torch.Tensor:
    """The prompt's last tokens, as many as leave room for max_new_tokens in max_seq_len."""
    limit = model.config.max_seq_len
    if sampling.max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens={sampling.max_new_tokens} must be below "
                         f"model.max_seq_len={limit}")
    return input_ids[:, -(limit - sampling.max_new_tokens):]


@torch.no_grad()
def stream(model: LanguageModel, input_ids: torch.Tensor, sampling: SamplingConfig,
           generator: torch.Generator | None = None,
           stop_token: int | None = None) -> Iterator[torch.Tensor]:
    """Each step's new tokens (B, 1), as soon as they are chosen (a chat prints them so).

    The prompt is cut from the left by `prompt_window`. With `use_cache` each step feeds
    only the new token (through `decoding_step` with `compile`; the prefill runs as
    `model`); without, each step recomputes the whole context (the reference the cached
    path must match token for token). Stops after `stop_token` in every row."""
    was_training = model.training
    model.eval()
    try:
        tokens = prompt_window(model, input_ids, sampling)
        cache = model.new_cache() if sampling.use_cache else None
        decode = decoding_step(model) if sampling.compile else model
        step_input = tokens
        for step in range(sampling.max_new_tokens):
            forward = decode if step else model
            logits = forward(step_input, cache).logits[:, -1]  # (B, V)
            token = next_token(logits, sampling, generator)
            yield token
            tokens = torch.cat((tokens, token), dim=1)
            step_input = token if cache is not None else tokens
            if stop_token is not None and bool((token == stop_token).all()):
                break
    finally:
        model.train(was_training)


def generate(model: LanguageModel, input_ids: torch.Tensor, sampling: SamplingConfig,
             generator: torch.Generator | None = None,
             stop_token: int | None = None) -> torch.Tensor:
    """input_ids: (B, T) -> (B, T' + n): the prompt cut to fit (`prompt_window`), then n <=
    max_new_tokens new tokens (`stream`)."""
    window = prompt_window(model, input_ids, sampling)
    return torch.cat([window, *stream(model, window, sampling, generator, stop_token)], dim=1)
