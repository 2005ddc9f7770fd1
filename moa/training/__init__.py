"""Training machinery: the train and evaluate tasks, the Lightning module, checkpoints,
run directories and their status, loggers, resume. Model code never imports it."""

from moa.training.eval_task import METRIC_KEYS, evaluate
from moa.training.train_task import train

__all__ = ["METRIC_KEYS", "evaluate", "train"]
