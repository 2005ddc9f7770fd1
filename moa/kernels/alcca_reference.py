"""ALCCA, brute force: the readable spec that `moa/attention/alcca.py` must match.

    out = alcca_attention_eager(q, k, v, alpha, top_k, theta, eps, weighting, key_norm)
    weights = alcca_probabilities(q, k, alpha, top_k, theta, eps, weighting, key_norm)

    q       (B, Hq, T, D)   queries in the head's metric space (where it is Euclidean)
    k, v    (B, Hkv, S, D)  keys (metric space) and values; Hq % Hkv == 0; the queries are
                            the last T of the S positions (causal: query i sees j <= S-T+i)
    alpha   (Hq,)           positive sharpness per query head (softmax weighting)
    key_norm                "free" or "sphere" (the keys as given), or "ignore"
    out     (B, Hq, T, D)
    weights (B, Hq, T, S)   each key's weight in each query's output (out = weights @ v)

For query i over its visible keys: with c_i their centre of mass, if ||q_i - c_i|| < theta
the output is the mean of their values; otherwise the min(top_k, visible) nearest keys N_i
by Euclidean distance d_ij are weighted by `neighbour_weights` and their values averaged.
Under key_norm=ignore with softmax weighting, as in metric attention, d_ij^2 is the squared
distance less both norms, -2 q_i.k_j: the neighbours are the keys of largest inner product
and the weights those of dot-product attention at sharpness 2 alpha. key_norm says what
becomes of a softmax score's key-norm term, so inverse_distance, which weighs by distances
and has no score, keeps Euclidean neighbours under any key_norm, as the theta test does.
Everything here is a dense (T, S) tensor: O(L^2) time and memory, for tests only.
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("inverse_distance", "softmax")


def by_inner_product(weighting: str, key_norm: str) -> bool:
    """Whether neighbours are ranked (and softmax-weighted) by q.k rather than distance."""
    return key_norm == "ignore" and weighting == "softmax"


def pair_distance_sq(q: torch.Tensor, k: torch.Tensor, inner_product: bool) -> torch.Tensor:
    """||q - k||^2 over the last axis of broadcastable q and k, or with `inner_product` -2 q.k
    (the squared distance without its ||q||^2 and ||k||^2 terms)."""
    if inner_product:
        return -2.0 * (q * k).sum(-1)
    return (q - k).pow(2).sum(-1)


def neighbour_weights(distance_sq: torch.Tensor, alpha: torch.Tensor, weighting: str,
                      eps: float, valid: torch.Tensor) -> torch.Tensor:
    """Normalised weights over the last axis for the chosen keys; `valid` marks real ones.

    inverse_distance: 1 / (d + eps), the card's rule (its gradient grows as 1/eps^2 where a
    query sits on a key); softmax: softmax(-alpha * d^2), metric attention's scores.
    `alpha` broadcasts against `distance_sq` without its last axis."""
    distance_sq = distance_sq.masked_fill(~valid, 0.0)  # no inf x 0 in any gradient
    if weighting == "inverse_distance":
        raw = 1.0 / (distance_sq.clamp_min(torch.finfo(distance_sq.dtype).tiny).sqrt() + eps)
        raw = raw.masked_fill(~valid, 0.0)
        return raw / raw.sum(-1, keepdim=True)
    scores = (-alpha[..., None] * distance_sq).masked_fill(~valid, float("-inf"))
    return torch.softmax(scores, dim=-1)


def alcca_probabilities(q: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, top_k: int,
                        theta: float, eps: float, weighting: str, key_norm: str = "free"
                        ) -> torch.Tensor:
    """The weight of every visible key in each query's output, (B, Hq, T, S): uniform over
    the visible keys for a query within theta of their centre, else `neighbour_weights`
    on its chosen neighbours and zero elsewhere. Shapes as `alcca_attention_eager`'s."""
    group = q.size(1) // k.size(1)
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, S, D)
    T, S = q.size(2), k.size(2)
    rows = torch.arange(T, device=q.device)[:, None] + (S - T)
    causal = torch.arange(S, device=q.device)[None, :] <= rows  # (T, S)
    average = causal.to(q.dtype) / causal.sum(-1, keepdim=True)  # (T, S) uniform rows
    centre = average @ k  # (B, Hq, T, D)
    near = (q - centre).norm(dim=-1) < theta  # (B, Hq, T)

    inner_product = by_inner_product(weighting, key_norm)
    distance_sq = pair_distance_sq(q[:, :, :, None], k[:, :, None], inner_product)  # (B, Hq, T, S)
    ranked = distance_sq.masked_fill(~causal, float("inf"))
    chosen_sq, chosen = ranked.topk(min(top_k, S), dim=-1, largest=False)  # (B, Hq, T, k)
    weights = neighbour_weights(chosen_sq, alpha.view(1, -1, 1), weighting, eps,
                                chosen_sq.isfinite())
    dense = torch.zeros_like(distance_sq).scatter(-1, chosen, weights)  # (B, Hq, T, S)
    return torch.where(near[..., None], average, dense)


def alcca_attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                          top_k: int, theta: float, eps: float, weighting: str,
                          key_norm: str = "free") -> torch.Tensor:
    probabilities = alcca_probabilities(q, k, alpha, top_k, theta, eps, weighting, key_norm)
    return probabilities @ v.repeat_interleave(q.size(1) // v.size(1), dim=1)
