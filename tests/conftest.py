"""Shared fixtures: offline environment, Hydra composition, shared data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach the network nor prompt: set before any library reads them.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in its interpreter. Triton reads this when first
# imported, which other libraries may do before any kernel test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The maintainers' small real datasets beside the project (never copied into it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


def tiny_model_config(attention: dict | None = None, position: str = "rope", **model):
    """A small ModelConfig for unit tests; `attention`/`model` entries override."""
    from moa.config import ModelConfig

    sections = {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 50, "max_seq_len": 64}
    sections.update(model)
    components = {
        "attention": {"name": "dot_product", **(attention or {})},
        "ffn": {"name": "swiglu"},
        "position": {"name": position},
        "norm": {"name": "rmsnorm"},
    }
    return ModelConfig.from_sections(sections, **components)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache of built corpora and tokenizers for the whole session."""
    return Path(os.environ.get("MOA_TEST_CACHE_DIR") or tmp_path_factory.mktemp("moa-cache"))


@pytest.fixture
def compose_config(tmp_path, cache_dir):
    """Compose `conf/<config_name>.yaml` with overrides, the template's way: Hydra's own
    config returned and set, so `${hydra:...}` interpolations resolve; outputs in tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    def _compose(*overrides: str, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                config_name=config_name, return_hydra_config=True,
                overrides=[
                    f"paths.root_dir={ROOT}",
                    f"paths.output_dir={tmp_path / 'run'}",
                    f"paths.cache_dir={cache_dir}",
                    f"paths.shared_data_dir={SHARED_DATA}",
                    f"hydra.run.dir={tmp_path / 'run'}",
                    *overrides,
                ],
            )
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
