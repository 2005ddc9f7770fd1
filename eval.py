"""Evaluate a trained run: python eval.py run_dir=DIR  (or ckpt_path=FILE)"""

import hydra
from omegaconf import DictConfig

import moa.training
from moa.errors import exit_on_config_error


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_config_error():
        moa.training.evaluate(cfg)


if __name__ == "__main__":
    main()
