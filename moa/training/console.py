"""The console of a run: what a person needs (the run's summary line, the model summary
with its parameter counts, the progress bar, validation results, samples), not upstream
notices. Each is silenced by its own message and where it comes from, never a category
of warnings as a whole."""

from __future__ import annotations

import logging
import warnings

# Lightning's advertisement for its cloud logger, logged at every Trainer's start
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
# the loggers Lightning's rank_zero_info logs through (lightning_utilities' `log`, which
# lightning.pytorch and lightning.fabric each point at their own on import)
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero")


class _WithoutPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_console() -> None:
    """Silence, for this process: Lightning's litlogger tip, and torch's deprecation of
    `LeafSpec` that Lightning's own pytree helper triggers at every fit (upstream's to fix;
    nothing a user of moa can change)."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutPrefix) for f in logger.filters):
            logger.addFilter(_WithoutPrefix(LITLOGGER_TIP))
