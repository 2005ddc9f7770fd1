"""Autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

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

    def __post_init__(self) -> None:
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
    only the new token; without, each step recomputes the whole context (the reference
    the cached path must match token for token). Stops after `stop_token` in every row."""
    was_training = model.training
    model.eval()
    try:
        tokens = prompt_window(model, input_ids, sampling)
        cache = model.new_cache() if sampling.use_cache else None
        step_input = tokens
        for _ in range(sampling.max_new_tokens):
            logits = model(step_input, cache).logits[:, -1]  # (B, V)
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
