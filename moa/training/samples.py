"""Greedy and sampled continuations of the configured prompts, printed after evaluation."""

from __future__ import annotations

from dataclasses import asdict

import torch

from moa.data import LMDataModule
from moa.models.generation import SamplingConfig, generate
from moa.training.lit import LanguageModelModule


def print_samples(module: LanguageModelModule, datamodule: LMDataModule,
                  sampling: SamplingConfig) -> None:
    tokenizer = datamodule.tokenizer
    model = module.model
    generator = torch.Generator(device=module.device).manual_seed(sampling.seed)
    greedy = SamplingConfig(**{**asdict(sampling), "temperature": 0.0})
    for prompt in sampling.prompts:
        ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]], device=module.device)
        for label, how in (("greedy", greedy), (f"sampled t={sampling.temperature}", sampling)):
            out = generate(model, ids, how, generator=generator, stop_token=tokenizer.eos_id)
            continuation = tokenizer.decode(out[0, ids.size(1):].tolist())
            print(f"--- {label} | {prompt!r}\n{prompt}{continuation}")
