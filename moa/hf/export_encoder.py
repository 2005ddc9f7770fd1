"""`python -m moa.export run_dir=DIR out=DIR2 part=encoder`: a Reactive Transformer run's
encoder and MLM head as a transformers masked LM (moa/hf/masked_lm.py).

DIR2 holds model.safetensors (the shared embedding, the encoder, the MLM head and the
initial STM the encoder reads where it reads memory), config.json (model_type
"moa_rxt_encoder", our model config under `moa`), the tokenizer with `[MASK]` as its mask
token, and README.md. After `import moa`:

    from transformers import pipeline
    fill = pipeline("fill-mask", model=DIR2)
    fill("The cat sat on the [MASK].")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moa.config import ModelConfig
from moa.errors import ConfigError
from moa.hf.masked_lm import MoaEncoderConfig, MoaForMaskedLM
from moa.hf.tokenizer import hf_tokenizer

MASK = "[MASK]"


def write_encoder(out: Path, run_dir: Path, checkpoint_path: Path, checkpoint: dict[str, Any],
                  model_config: ModelConfig) -> None:
    tokenizer = hf_tokenizer(run_dir / "tokenizer.json", mask_token=MASK)
    if tokenizer is None or tokenizer.convert_tokens_to_ids(MASK) in (None, tokenizer.unk_token_id):
        raise ConfigError("run_dir", str(run_dir), f"an RxT run whose tokenizer has {MASK}",
                          "a fill-mask export needs the mask token")
    model = MoaForMaskedLM(MoaEncoderConfig.from_model_config(
        model_config, pad_token_id=tokenizer.pad_token_id,
        mask_token_id=tokenizer.mask_token_id))
    wanted = model.state_dict()
    state = {name: value for name, value in checkpoint["state_dict"].items() if name in wanted}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ConfigError("ckpt_path", str(checkpoint_path), "an RxT checkpoint",
                          f"the encoder's weights {missing[:4]} are not in it")
    model.load_state_dict(state)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(run_dir, checkpoint_path,
                                              OmegaConf.load(run_dir / "config.yaml"), model))


def model_card(run_dir: Path, checkpoint: Path, run_config: DictConfig,
               model: MoaForMaskedLM) -> str:
    parameters = sum(p.numel() for p in model.parameters())
    return f"""---
library_name: transformers
pipeline_tag: fill-mask
tags: [moa, reactive-transformer, mlm]
---
# {model.config.moa["name"]} encoder and MLM head ({parameters / 1e6:.2f}M parameters)

The encoder of a Reactive Transformer trained with moa, exported from `{run_dir}`
(checkpoint `{checkpoint.name}`) by `python -m moa.export part=encoder`.

```python
import moa  # registers model_type "moa_rxt_encoder"; pip install "moa[hf]"
from transformers import pipeline

fill = pipeline("fill-mask", model=PATH)
print(fill("The cat sat on the {MASK}."))
```

## Training config

```yaml
{OmegaConf.to_yaml(run_config)}```
"""
