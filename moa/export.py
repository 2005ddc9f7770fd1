"""Export a trained run as a Hugging Face model directory (moa/hf/export.py):

    python -m moa.export run_dir=DIR out=DIR2      (or ckpt_path=FILE; checkpoint=best|last)
"""

from omegaconf import DictConfig

from moa.errors import entry_point, exit_on_config_error
from moa.hf.export import export


@entry_point(config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_config_error():
        print(export(cfg))


if __name__ == "__main__":
    main()
