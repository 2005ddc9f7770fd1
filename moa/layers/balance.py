"""Load-balance losses over a router's outputs: pure functions, each a differentiable scalar.

With `n` paths, `p` the router's per-token probabilities (..., n) and `z` its logits:

- `mse_uniform` (MoAS): `mean_i (mean_t p_ti - 1/n)^2`, zero when the paths are used
  equally on average.
- `switch` (Switch Transformer): `n * sum_i f_i P_i`, with `f_i` the fraction of routing
  slots dispatched to path i (a token with k chosen paths fills k slots; `sum_i f_i = 1`)
  and `P_i = mean_t p_ti`. It is 1 under uniform routing and grows as routing collapses;
  only `P` carries the gradient, as `f` comes from a hard choice.
- `z_loss` (ST-MoE): `mean_t logsumexp(z_t)^2`, keeping the logits small so the softmax
  stays in a numerically comfortable range.
"""

from __future__ import annotations

import torch


def mean_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (n,): each path's probability averaged over every token."""
    return probs.reshape(-1, probs.size(-1)).float().mean(0)


def mse_uniform(probs: torch.Tensor) -> torch.Tensor:
    """probs: (..., n) -> scalar mean squared distance of the mean probabilities to 1/n."""
    mean = mean_probabilities(probs)
    return (mean - 1.0 / mean.numel()).pow(2).mean()


def switch(probs: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
    """probs: (..., n); dispatch: (..., n), 1 where a token runs a path, else 0."""
    slots = dispatch.reshape(-1, dispatch.size(-1)).float()  # (N, n)
    fraction = slots.sum(0) / slots.sum()  # (n,), sums to one
    return probs.size(-1) * (fraction * mean_probabilities(probs)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits: (..., n) -> scalar mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
