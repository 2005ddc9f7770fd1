"""The one error type a user sees for bad input, and the entry points' wrapper that turns
it (and Hydra's own composition errors) into one line.

`train.py`, `eval.py` and `moa/export.py` are `@entry_point(config_path, config_name)`
functions: a bad override, an unknown group option, a missing key or a refused value
prints one `error: invalid config KEY=VALUE (why); allowed: ...` line and exits 2. A
directory Hydra made for this invocation (its `.hydra/` and job log) is removed again
when the invocation is refused, so a typo leaves no stub run behind; a directory that was
there before is left as it was, the refusal written to its job log only.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


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
    no traceback. The refusal goes to the job's log file too, and a run directory that
    Hydra made for this invocation is removed (`NewRunDirectory`)."""
    try:
        yield
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        _log_to_job_file(f"error: {error}")
        NewRunDirectory.remove_if_refused()
        raise SystemExit(2) from None
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


class NewRunDirectory(Callback):
    """A Hydra callback (conf/hydra/default.yaml) that notes, before Hydra makes the run
    directory, whether it is new: only then may a refused invocation remove it."""

    created: Path | None = None  # the directory this invocation made, once Hydra made it

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        # The run directory's default reads ${hydra:runtime.cwd}, which resolves only once
        # HydraConfig holds the config: Hydra sets the same one itself just after this.
        HydraConfig.instance().set_config(config)
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        NewRunDirectory.created = None if run_dir.exists() else run_dir

    @classmethod
    def remove_if_refused(cls) -> None:
        """Remove the run directory if this invocation made it (RUN mode only: a sweep's
        job directories keep their status.json saying why a job failed)."""
        from hydra.core.hydra_config import HydraConfig

        if cls.created is None or not HydraConfig.initialized():
            return
        if Path(HydraConfig.get().runtime.output_dir).absolute() == cls.created:
            shutil.rmtree(cls.created, ignore_errors=True)
            cls.created = None


def _log_to_job_file(message: str) -> None:
    """Write `message` to the job's log files only (the console has its one line)."""
    record = logging.LogRecord("moa", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def entry_point(config_path: str, config_name: str) -> Callable[[Callable[[DictConfig], Any]],
                                                               Callable[[], Any]]:
    """`@hydra.main(version_base="1.3", ...)` whose composition errors (an unknown group
    option, an override of a missing key, an override that does not parse) are one
    `error: invalid config ...` line and exit status 2, like a ConfigError."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        import hydra

        hydra_main = hydra.main(version_base="1.3", config_path=config_path,
                                config_name=config_name)(task)
        config_dir = (Path(inspect.getfile(task)).parent / config_path).resolve()

        @functools.wraps(task)
        def main() -> Any:
            # Hydra prints its errors over several lines and exits 1; this makes it raise
            # them here instead (unless the user asked for the full errors themselves).
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                return hydra_main()
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return hydra_main()
            except (ConfigCompositionException, OverrideParseException) as error:
                print(f"error: {composition_error(error, sys.argv[1:], config_dir, config_name)}",
                      file=sys.stderr)
                raise SystemExit(2) from None

        return main

    return decorate


def composition_error(error: Exception, overrides: list[str], config_dir: Path,
                      config_name: str) -> ConfigError:
    """Hydra's composition error as a ConfigError naming the key and what is allowed."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").rsplit("/", 1)
        key = group[0].replace("/", ".") if len(group) == 2 else first_line
        return ConfigError(key, _given(overrides, key), " | ".join(sorted(error.options)),
                           "no such option")
    missing = re.match(r"Could not override '([^']+)'", first_line)
    if missing:
        key = missing.group(1)
        siblings = _siblings(key, overrides, config_dir, config_name)
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], siblings, n=1)
        reason = f"no such key; did you mean {close[0]!r}?" if close else \
            f"no such key; +{key}=... adds one"
        return ConfigError(key, _given(overrides, key),
                           f"keys {siblings}" if siblings else "an existing key", reason)
    if isinstance(error, OverrideParseException):
        reason = " ".join(line.strip() for line in str(error).splitlines()
                          if line.strip() and not line.startswith("See "))
        bad = _unparsable(overrides)
        key, _, value = (bad or "override=").lstrip("+~").partition("=")
        return ConfigError(key, value if bad else " ".join(overrides),
                           "KEY=VALUE in Hydra's override grammar (quote special characters)",
                           reason)
    quoted = re.search(r"'([^']+)'", first_line)  # e.g. "Could not delete ... 'bogus' ..."
    key = quoted.group(1) if quoted else "override"
    return ConfigError(key, _given(overrides, key), "overrides Hydra can compose",
                       " ".join(str(error).split()))


def _given(overrides: list[str], key: str) -> str | None:
    """The value `key` was given on the command line (None where it was not)."""
    for override in overrides:
        name, equals, value = override.lstrip("+~").partition("=")
        if name in (key, key.replace(".", "/")):
            return value if equals else None
    return None


def _unparsable(overrides: list[str]) -> str | None:
    """The first command-line override that Hydra's grammar cannot parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        if override.startswith("-"):
            continue
        try:
            parser.parse_override(override)
        except HydraException:
            return override
    return None


def _siblings(key: str, overrides: list[str], config_dir: Path, config_name: str) -> list[str]:
    """The keys beside `key` in the config composed without it (empty if that fails too)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    parent = key.rsplit(".", 1)[0] if "." in key else ""
    kept = [o for o in overrides if "=" in o and not o.startswith(("-", "hydra"))
            and o.lstrip("+~").partition("=")[0] != key]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=kept)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(str(name) for name in node) if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001  (only a hint: the error line stands without it)
        return []
