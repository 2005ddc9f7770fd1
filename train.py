"""Train a language model: python train.py [group=option ...] [key=value ...]"""

import hydra
from omegaconf import DictConfig

import moa.tasks
from moa.errors import exit_on_config_error


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_config_error():
        metrics, _ = moa.tasks.train(cfg)
    return metrics.get("val_loss")  # the objective a sweeper (e.g. Optuna) minimises


if __name__ == "__main__":
    main()
