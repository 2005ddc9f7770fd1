"""The one error type a user sees for bad input."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid.

    The message names the full key, the value given and what is allowed, so a bad
    override fails before anything runs with one readable line.
    """

    def __init__(self, key: str, value: Any, allowed: str, reason: str = "") -> None:
        self.key, self.value, self.allowed, self.reason = key, value, allowed, reason
        why = f" ({reason})" if reason else ""
        super().__init__(f"invalid config {key}={value!r}{why}; allowed: {allowed}")

    def __reduce__(self):
        # rebuilt from its fields, so it crosses process boundaries (joblib, submitit)
        return ConfigError, (self.key, self.value, self.allowed, self.reason)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under `prefix` (e.g. `attention`)."""
        key = f"{prefix}.{self.key}" if prefix else self.key
        return ConfigError(key, self.value, self.allowed, self.reason)


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. non-finite steps in a row); the message says why and where
    the last good checkpoint is."""


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turn a ConfigError into a one-line message and exit status 2 (1 for TrainingStopped),
    no traceback."""
    try:
        yield
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
