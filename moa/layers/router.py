"""Token routers: per-token weights over the paths of a mixture (`moa/attention/mixture.py`).

Three kinds, one class each in the `ROUTER` registry, chosen by the config's `name`
(`conf/router/*.yaml`):

- `static`: the plain average of the paths (static MoAS); no parameters.
- `softmax`: dense per-token weights `softmax(logits / router_temperature)` (MoAS).
- `topk`: the `router_topk` most probable paths per token, their probabilities
  renormalised to sum to one; the others get weight exactly 0, so the mixture skips
  their per-token work.

Logits come from `Linear(C, n)`, or from a 2-layer GELU MLP when `router_hidden` is set;
`router_dropout` drops the router's input features. Two switchable extras, both
zero-initialised so that switching one on starts from the same function:

- router-bias gates (`enable_router_gates`): a per-path bias on the logits computed from
  the token by its own linear map, beside the MLP;
- feature gates (`enable_feature_gates`, `FeatureGates`): FiLM per path, each path's
  output scaled and shifted by functions of the token (applied by the mixture).

A router returns a `Routing` and, in training, records under its scope the balance losses
of `moa/layers/balance.py` whose weight is non-zero and, per path, its usage (mean weight;
the usages sum to one), the fraction of tokens that run it (topk: these sum to k) and the
mean entropy of the router's probabilities. In eval mode it records nothing: only training
steps log them, and a decoding step would pay a dozen small ops a layer for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moa.layers import balance
from moa.layers.activation import GELU
from moa.layers.auxiliary import AuxiliaryRecorder
from moa.layers.context import select_positions
from moa.layers.residual import Dropout
from moa.registry import Registry
from moa.schema import check, check_choice, check_range

ROUTER: Registry[nn.Module] = Registry("router")


@dataclass
class RouterConfig:
    """Keys named after the MoA cards' config.json (`router_*`, `enable_*_gates`).

    Only ever the `router` field of a mixture's config: error keys start with `router.`.
    """

    name: str = "softmax"
    router_hidden: int | None = None  # None: a linear router; else Linear -> GELU -> Linear
    router_dropout: float = 0.0  # on the router's input features
    router_temperature: float = 1.0  # logits are divided by it before the softmax
    router_topk: int = 2  # paths kept per token (topk only)
    enable_feature_gates: bool = False
    enable_router_gates: bool = False
    mse_uniform_weight: float = 0.0  # balance-loss weights (conf/regularizer/)
    switch_weight: float = 0.0
    z_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        check_choice("router.name", self.name, ROUTER.names())
        check(self.router_hidden is None or self.router_hidden > 0, "router.router_hidden",
              self.router_hidden, "a positive integer, or null for a linear router")
        check_range("router.router_dropout", self.router_dropout, 0.0, 1.0, high_open=True)
        check(self.router_temperature > 0, "router.router_temperature",
              self.router_temperature, "a positive float")
        check(self.router_topk > 0, "router.router_topk", self.router_topk, "a positive integer")
        for key in ("mse_uniform_weight", "switch_weight", "z_loss_weight"):
            value = getattr(self, key)
            check(value >= 0, f"router.{key}", value, ">= 0")
            check(self.name != "static" or value == 0, f"router.{key}", value,
                  "0.0 with router=static", "a static router has nothing to balance")
        check(self.name != "static" or not self.enable_router_gates, "router.enable_router_gates",
              self.enable_router_gates, "false with router=static", "a static router has no logits")

    @property
    def weights(self) -> dict[str, float]:
        return {"mse_uniform": self.mse_uniform_weight, "switch": self.switch_weight,
                "z_loss": self.z_loss_weight}


@dataclass
class Routing:
    weights: torch.Tensor  # (B, T, n) mixing weights; rows sum to one, 0 on unchosen paths
    probs: torch.Tensor  # (B, T, n) the router's probabilities before any top-k
    logits: torch.Tensor | None = None  # (B, T, n) the softmax's input; None for static
    chosen: torch.Tensor | None = None  # (B, T, n) bool, the paths a token runs; None: all

    def at(self, positions: torch.Tensor) -> Routing:
        """The routing of the tokens at positions (B, K) only: (B, K, n) fields."""
        return Routing(*(None if field is None else select_positions(field, positions)
                         for field in (self.weights, self.probs, self.logits, self.chosen)))

    def dispatch(self) -> torch.Tensor:
        """(B, T, n) 0/1: the chosen paths, or each token's most probable one if dense."""
        if self.chosen is not None:
            return self.chosen.to(self.probs.dtype)
        return F.one_hot(self.probs.argmax(-1), self.probs.size(-1)).to(self.probs.dtype)


def record_usage(routing: Routing, record: AuxiliaryRecorder) -> None:
    usage = balance.mean_probabilities(routing.weights)  # (n,), sums to one
    routed = balance.mean_probabilities(
        routing.chosen if routing.chosen is not None else torch.ones_like(routing.weights))
    probs = routing.probs.float()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    for index in range(usage.numel()):
        record.stat(f"usage.{index}", usage[index])
        record.stat(f"routed.{index}", routed[index])
    record.stat("entropy", entropy)


@ROUTER.register("static", RouterConfig)
class StaticRouter(nn.Module):
    def __init__(self, config: RouterConfig, d_model: int, n_paths: int) -> None:
        super().__init__()
        self.n_paths = n_paths

    def forward(self, x: torch.Tensor, record: AuxiliaryRecorder) -> Routing:
        """x: (B, T, C) -> weights 1/n for every token and path."""
        weights = x.new_full((*x.shape[:-1], self.n_paths), 1.0 / self.n_paths,
                             dtype=torch.float32)
        routing = Routing(weights, weights)
        if self.training and record.wants_stats:
            record_usage(routing, record)
        return routing


@ROUTER.register("softmax", RouterConfig)
class TokenRouter(nn.Module):
    """Dense softmax routing; `TopKRouter` changes only `select`."""

    def __init__(self, config: RouterConfig, d_model: int, n_paths: int) -> None:
        super().__init__()
        self.config = config
        self.dropout = Dropout(config.router_dropout)
        hidden = config.router_hidden
        self.scores = nn.Linear(d_model, n_paths) if hidden is None else nn.Sequential(
            nn.Linear(d_model, hidden), GELU(), nn.Linear(hidden, n_paths))
        self.bias_gate = None
        if config.enable_router_gates:
            self.bias_gate = nn.Parameter(torch.zeros(d_model, n_paths))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, n), already divided by the temperature."""
        x = self.dropout(x)
        logits = self.scores(x)
        if self.bias_gate is not None:
            logits = logits + x @ self.bias_gate.to(x.dtype)
        logits = logits.float()
        temperature = self.config.router_temperature
        return logits if temperature == 1.0 else logits / temperature

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return probs, None

    def forward(self, x: torch.Tensor, record: AuxiliaryRecorder) -> Routing:
        """x: (B, T, C) -> the `Routing` of every token; records losses and stats."""
        logits = self.logits(x)
        probs = logits.softmax(-1)
        weights, chosen = self.select(probs)
        routing = Routing(weights, probs, logits, chosen)
        if not self.training:
            return routing
        losses = {"mse_uniform": lambda: balance.mse_uniform(probs),
                  "switch": lambda: balance.switch(probs, routing.dispatch()),
                  "z_loss": lambda: balance.z_loss(logits)}
        for name, weight in self.config.weights.items():
            if weight > 0:
                record.loss(name, losses[name](), weight)
        if record.wants_stats:
            record_usage(routing, record)
        return routing


@ROUTER.register("topk", RouterConfig)
class TopKRouter(TokenRouter):
    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """probs: (B, T, n) -> renormalised top-k weights and the chosen mask."""
        top = probs.topk(self.config.router_topk, dim=-1).indices  # (B, T, k)
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top, True)
        kept = probs.where(chosen, 0.0)
        return kept / kept.sum(-1, keepdim=True), chosen


class FeatureGates(nn.Module):
    """FiLM per path: `y_i * (1 + scale_i(x)) + shift_i(x)`, scale and shift linear in the
    token x. Zero-initialised (as raw parameters, which the model's init leaves alone) so
    the gates start as the identity."""

    def __init__(self, d_model: int, n_paths: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_paths, d_model, 2 * d_model))
        self.bias = nn.Parameter(torch.zeros(n_paths, 2 * d_model))

    def forward(self, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (..., C), the tokens and path `index`'s outputs for them -> (..., C)."""
        film = x @ self.weight[index].to(x.dtype) + self.bias[index].to(x.dtype)
        scale, shift = film.chunk(2, dim=-1)
        return y * (1 + scale) + shift
