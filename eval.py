"""Evaluate a trained run: python eval.py run_dir=DIR  (or ckpt_path=FILE)"""

from omegaconf import DictConfig

import moa.training
from moa.errors import entry_point, exit_on_config_error


@entry_point(config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_config_error():
        moa.training.evaluate(cfg)


if __name__ == "__main__":
    main()
