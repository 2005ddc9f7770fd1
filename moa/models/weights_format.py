"""What a model's weights mean, by version: checkpoints and exported directories carry it.

    1  metric attention (and ALCCA) applied the diagonal Mahalanobis weights after the
       rotary encoding, so that their scores depended on absolute positions.
    2  the weights are applied before the rotation (moa/attention/metric.py). A version-1
       model that has no maha_diag metric under a rotary encoding computes the same here.
       Metric attention gained `key_norm`: a version-1 config, which has none, had free
       keys (`upgraded_config` says so explicitly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

WEIGHTS_FORMAT = 2
ROTARY = ("rope", "blackhole_rope")


def stale_weights(model_config: Mapping[str, Any], version: int | None) -> str | None:
    """Why weights saved at `version` for `model_config` (ModelConfig.to_dict()) cannot run
    as they were trained under this code; None when they can."""
    if version == WEIGHTS_FORMAT:
        return None
    if version != 1:
        return f"format version {version}, where this moa reads 1 and {WEIGHTS_FORMAT}"
    position = model_config.get("position", {}).get("name")
    if position in ROTARY and _uses_mahalanobis(model_config):
        return ("format version 1 applied the Mahalanobis weights after the rotary "
                "encoding (scores that depended on absolute positions); this moa applies "
                "them before it, so these weights would compute another function: retrain")
    return None


def upgraded_config(model_config: Mapping[str, Any], version: int | None) -> dict[str, Any]:
    """`model_config` as this code reads it: a format-1 config's metric attentions (and
    ALCCA's) get the `key_norm: free` they were trained with, wherever they sit (the
    attention, a mixture's paths, the LM head's)."""
    if version == WEIGHTS_FORMAT:
        return dict(model_config)

    def upgrade(node: Any) -> Any:
        if isinstance(node, Mapping):
            node = {key: upgrade(value) for key, value in node.items()}
            if node.get("name") in ("metric", "alcca") and "metric" in node:
                node.setdefault("key_norm", "free")
            return node
        if isinstance(node, list | tuple):
            return [upgrade(value) for value in node]
        return node

    return upgrade(model_config)


def _uses_mahalanobis(node: Any) -> bool:
    if isinstance(node, Mapping):
        metric = node.get("metric")
        if isinstance(metric, Mapping) and metric.get("name") == "maha_diag":
            return True
        return any(_uses_mahalanobis(value) for value in node.values())
    if isinstance(node, list | tuple):
        return any(_uses_mahalanobis(value) for value in node)
    return False
