"""Train a language model: python train.py [group=option ...] [key=value ...]"""

from contextlib import nullcontext

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import moa.training
from moa.errors import entry_point, exit_on_config_error


@entry_point(config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # In a sweep a bad job raises like any failure: its status.json says why, the launcher
    # records it and runs the other jobs. A single run exits with one line instead.
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    with nullcontext() if sweeping else exit_on_config_error():
        metrics, _ = moa.training.train(cfg)
    return metrics.get("val_loss")  # the objective a sweeper (e.g. Optuna) minimises


if __name__ == "__main__":
    main()
