"""Export a trained run as a Hugging Face model directory.

    python -m moa.export run_dir=DIR out=DIR2      (or ckpt_path=FILE; checkpoint=best|last)

(the command is moa/export.py; this module is what it runs)

DIR2 holds model.safetensors (the uncompiled model's weights, the tied LM head stored
once), config.json (model_type "moa_metric", our model config under `moa`),
generation_config.json (bos/eos/pad ids), the tokenizer (tokenizer.json and
tokenizer_config.json with the special tokens and the chat template below), README.md (a
model card with the run's config and metrics) and moa_run.yaml (the run's config, which
eval.py reads to evaluate DIR2 as it would the run).

Chat format (`tokenizer.apply_chat_template`): moa/data/chat_template.py, the one
definition that training on conversations (`data=chat`) renders with too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig

from moa.config import ModelConfig
from moa.data.chat_template import ROLES
from moa.errors import ConfigError
from moa.hf.export_dir import export_directory
from moa.hf.export_encoder import write_encoder
from moa.hf.modeling import MoaConfig, MoaForCausalLM
from moa.hf.remote_code import AUTO_MAP, write_remote_code
from moa.hf.tokenizer import hf_tokenizer
from moa.schema import check, check_choice
from moa.training.checkpoint import load_checkpoint
from moa.training.run_files import EXPORTED_RUN_CONFIG, locate_checkpoint
from moa.training.values import check_top_level


def export(cfg: DictConfig) -> Path:
    """Write the Hugging Face directory `cfg.out` from a run's checkpoint; return it. `out`
    is a new or empty directory, or an earlier export with `overwrite=true`; never a run
    directory (moa/hf/export_dir.py)."""
    check_top_level(cfg)
    if not cfg.get("out"):
        raise ConfigError("out", cfg.get("out"), "a directory to write the exported model to")
    part = cfg.get("part", "model")
    check_choice("part", part, sorted(PARTS))
    run_dir, checkpoint_path = locate_checkpoint(cfg)
    checkpoint = load_checkpoint(checkpoint_path)
    model_config = ModelConfig.from_dict({**checkpoint["model_config"], "compile": False})
    write, architecture = PARTS[part]
    check(model_config.architecture == architecture, "part", part,
          " | ".join(name for name, (_, kind) in PARTS.items()
                     if kind == model_config.architecture),
          f"the run's model is a {model_config.architecture}; part={part} exports a "
          f"{architecture}'s")
    with export_directory(Path(cfg.out), run_dir, cfg.get("overwrite", False)) as out:
        write(out, run_dir, checkpoint_path, checkpoint, model_config)
    return Path(cfg.out)


def _write(out: Path, run_dir: Path, checkpoint_path: Path, checkpoint: dict[str, Any],
           model_config: ModelConfig) -> None:
    tokenizer = hf_tokenizer(run_dir / "tokenizer.json")
    ids = {} if tokenizer is None else {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}
    model = MoaForCausalLM(MoaConfig.from_model_config(model_config, **ids))
    model.load_state_dict(checkpoint["state_dict"])  # the Lightning module's `model.` keys
    model.generation_config = GenerationConfig(**ids)
    model.config.auto_map = AUTO_MAP  # loads without moa: trust_remote_code=True
    model.save_pretrained(out)
    write_remote_code(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    run_config = OmegaConf.load(run_dir / "config.yaml")
    OmegaConf.save(run_config, out / EXPORTED_RUN_CONFIG)
    (out / "README.md").write_text(model_card(run_dir, checkpoint_path, run_config, model))


def model_card(run_dir: Path, checkpoint: Path, run_config: DictConfig,
               model: MoaForCausalLM) -> str:
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    rows = "\n".join(f"| {key} | {value:.4g} |" for key, value in metrics.items())
    config_text = OmegaConf.to_yaml(run_config)
    name = model.config.moa["name"]
    return f"""---
library_name: transformers
tags: [moa, {name}]
---
# {name} ({model.model.num_parameters() / 1e6:.2f}M parameters)

Trained with moa and exported from `{run_dir}`
(checkpoint `{checkpoint.name}`) by `python -m moa.export`.

## Use

```python
import moa  # registers model_type "moa_metric"; pip install "moa[hf]"
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(PATH)
tokenizer = AutoTokenizer.from_pretrained(PATH)
inputs = tokenizer(["Once upon a time"], return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```

Chat format: `<|bos|>`, then each message as `<|role|>content` (roles: {", ".join(ROLES)}),
an assistant message closed by `<|eos|>`; `apply_chat_template(..., add_generation_prompt=True)`
ends with `<|assistant|>`.

## Metrics

| metric | value |
|---|---|
{rows or "| (none recorded) | |"}

## Training config

```yaml
{config_text}```
"""


# part -> (its writer, the architecture it exports); encoder: an RxT run's, for fill-mask
PARTS = {"model": (_write, "language_model"), "encoder": (write_encoder, "reactive")}
