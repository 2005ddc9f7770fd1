"""The job's log file: Lightning's own messages go to it too."""

from __future__ import annotations

import logging

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
JOB_FILE_LOGGER = "moa.job_file"  # the job's log file only, not the console


def job_file_log() -> logging.Logger:
    """A logger that writes to the job's log file and not to the console: for what a run's
    record should say and a person at the terminal need not read (that a step's FLOPs could
    not be counted). Without a log file (a test, a notebook) its INFO goes nowhere."""
    logger = logging.getLogger(JOB_FILE_LOGGER)
    logger.propagate = False
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    logger.handlers = files
    logger.setLevel(logging.INFO)
    return logger


def log_lightning_to_the_job_file() -> None:
    """Lightning, imported before Hydra set up logging, gave its `lightning.pytorch` and
    `lightning.fabric` loggers a console handler of their own and stopped them propagating,
    so the job's log file (Hydra's `<run dir>/train.log`) missed their messages, why
    training stopped early among them. Hand those loggers the root logger's file handlers
    (this job's: a sweep's earlier job's are dropped); the console stays as it was."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if logger.propagate:
            continue  # its records reach the root's handlers already
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
        for handler in files:
            logger.addHandler(handler)
