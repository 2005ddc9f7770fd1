"""Evaluate a trained run: python eval.py run_dir=DIR  (or ckpt_path=FILE)"""

import hydra
from omegaconf import DictConfig

import moa.tasks
from moa.errors import exit_on_config_error


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_config_error():
        moa.tasks.evaluate(cfg)


if __name__ == "__main__":
    main()
