"""Checks of the values that no config dataclass parses: the top-level keys of train.yaml,
eval.yaml and export.yaml, and the `_target_` sections (trainer, callbacks, loggers),
whose keys are the arguments of the class they build.

A `_target_` section is checked against its class's signature: every key must be an
argument, and every value must have the argument's annotated type (a boolean is not an
integer, `maybe` is not a boolean). Values with a range have one here (`RANGES`):
`trainer.max_steps=0` would train nothing and leave no checkpoint.
"""

from __future__ import annotations

import datetime
import importlib
import inspect
import os
import re
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moa.config import ModelConfig
from moa.errors import ConfigError
from moa.schema import check

BOOLEAN, INTEGER, SEED = "true | false", "an integer", "an integer in [0, 2**32)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_path(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() != "")


# top-level key -> (holds, allowed); each entry file's keys, the groups aside
TOP_LEVEL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task_name": (lambda v: isinstance(v, str) and v != "", "a name"),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, SEED),
    "ckpt_path": (_is_path, "null or a checkpoint file"),
    "run_dir": (_is_path, "null or a run directory"),
    "out": (_is_path, "a directory to write the exported model to"),
    "resume": (lambda v: v in (True, False, "auto") and v is not None, "false | true | auto"),
    "evaluate": (lambda v: isinstance(v, bool), BOOLEAN),
    "keep_host_memory": (lambda v: isinstance(v, bool), BOOLEAN),
    "overwrite": (lambda v: isinstance(v, bool), BOOLEAN),
    "allow_untrained": (lambda v: isinstance(v, bool), BOOLEAN),
    "checkpoint": (lambda v: v in ("best", "last"), "best | last"),
    "attention_override": (lambda v: v is None or (isinstance(v, str) and v != ""),
                           "null or an attention scheme's name"),
}


def check_top_level(cfg: DictConfig) -> None:
    """Every top-level value of `TOP_LEVEL` that `cfg` holds (train.yaml's, eval.yaml's or
    export.yaml's) has its allowed form."""
    for key, (holds, allowed) in TOP_LEVEL.items():
        if key in cfg:
            value = cfg[key]
            check(holds(value), key, value, allowed)


def _count(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


def _batches(v: Any) -> bool:
    """A number of batches (an integer >= 0) or a fraction of them (a float in [0, 1])."""
    return v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)


# class.argument -> (holds, allowed), beyond the annotated type
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "Trainer.max_steps": (lambda v: _is_int(v) and (v >= 1 or v == -1),
                          "a positive number of optimizer steps, or -1 (max_epochs decides)"),
    "Trainer.max_epochs": (lambda v: v is None or (_is_int(v) and (v >= 1 or v == -1)),
                           "null, a positive integer or -1"),
    "Trainer.devices": (lambda v: (_is_int(v) and (v >= 1 or v == -1)) or v == "auto"
                        or (isinstance(v, str) and re.fullmatch(r"-1|\d+(,\s*\d+)*,?", v)
                            is not None)
                        or (isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)),
                        "auto, a positive count, -1 (all) or a list of device indices"),
    "Trainer.accelerator": (lambda v: v in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
                            "auto | cpu | gpu | cuda | mps | tpu"),
    "Trainer.num_nodes": (_count(1), "a positive integer"),
    "Trainer.accumulate_grad_batches": (_count(1), "a positive integer"),
    "Trainer.log_every_n_steps": (lambda v: v is None or _count(1)(v), "a positive integer"),
    "Trainer.num_sanity_val_steps": (lambda v: v is None or _count(-1)(v),
                                     "an integer >= 0, or -1 (all)"),
    "Trainer.val_check_interval": (
        lambda v: v is None or isinstance(v, dict) or (_is_int(v) and v >= 1)
        or (isinstance(v, float) and 0.0 < v <= 1.0)
        or (isinstance(v, str) and re.fullmatch(r"\d+(:\d+){1,3}", v) is not None),
        "a positive number of steps, a fraction of an epoch in (0, 1] or a time DD:HH:MM:SS"),
    "Trainer.check_val_every_n_epoch": (lambda v: v is None or _count(1)(v),
                                        "null or a positive integer"),
    "Trainer.limit_train_batches": (_batches, "an integer >= 0 or a fraction in [0, 1]"),
    "Trainer.limit_val_batches": (_batches, "an integer >= 0 or a fraction in [0, 1]"),
    "Trainer.limit_test_batches": (_batches, "an integer >= 0 or a fraction in [0, 1]"),
    "Trainer.gradient_clip_val": (lambda v: v is None or v >= 0, "null or a value >= 0"),
    "ModelCheckpoint.every_n_train_steps": (lambda v: v is None or _count(0)(v),
                                            "null or an integer >= 0"),
    "ModelCheckpoint.save_top_k": (_count(-1), "an integer >= 0, or -1 (all)"),
    "TokenThroughput.window_size": (_count(1), "a positive integer"),
    "ModelCheckpoint.mode": (lambda v: v in ("min", "max"), "min | max"),
}


def check_targets(cfg: DictConfig, sections: tuple[str, ...] = ("callbacks", "logger")) -> None:
    """The trainer section and every callback and logger of `sections` (eval has none):
    each key an argument of its `_target_`, each value of its type and in its range."""
    if "trainer" in cfg:
        check_target("trainer", _unresolved(cfg.trainer))
    for section in sections:
        for name, node in (_unresolved(cfg[section]) or {}).items() if section in cfg else ():
            if node is not None:
                check_target(f"{section}.{name}", node)


def _unresolved(node: Any) -> Any:
    """The plain value with interpolations left as text (they are resolved at run time:
    `${paths.output_dir}`, the wandb logger's run name)."""
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def check_target(key: str, section: Mapping[str, Any]) -> None:
    if not isinstance(section, Mapping) or "_target_" not in section:
        raise ConfigError(key, section, "a mapping with _target_ and the target's arguments")
    target = _import(key, section["_target_"])
    parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    hints = _hints(target)
    for name, value in section.items():
        if name.startswith("_"):
            continue
        full = f"{key}.{name}"
        if name not in parameters:
            check(takes_any, full, value, f"arguments of {section['_target_']}", "unknown key")
            continue
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: its value exists only at run time
        if name in hints:
            check(_matches(value, hints[name]), full, value, _describe(hints[name]),
                  "wrong type")
        holds, allowed = RANGES.get(f"{target.__name__}.{name}", (None, ""))
        if holds is not None and not isinstance(value, Mapping):
            check(holds(value), full, value, allowed)


def _import(key: str, target: Any) -> Any:
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{key}._target_", target, "an importable class",
                          str(error).splitlines()[0]) from None


def _hints(target: Any) -> dict[str, Any]:
    """The arguments' annotations, evaluated one by one where they are strings (one that
    names a type its module imports only for type checkers stays unchecked)."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001  (some annotation does not evaluate: take the others)
        pass
    namespace = {**vars(typing), **getattr(inspect.getmodule(function), "__dict__", {})}
    hints = {}
    for name, parameter in inspect.signature(function).parameters.items():
        annotation = parameter.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # noqa: S307  (a library's annotation)
            except Exception:  # noqa: BLE001
                continue
        hints[name] = annotation
    return hints


def _matches(value: Any, hint: Any) -> bool:
    """Whether a plain config value (None, bool, int, float, str, list, dict) fits `hint`."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == arm and type(value) is type(arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (Path, os.PathLike):
        return isinstance(value, str)
    if isinstance(value, Mapping) and "_target_" in value:
        return True  # an object built from its own config
    base = origin or hint
    if inspect.isclass(base) and issubclass(base, Mapping):
        return isinstance(value, Mapping)
    if inspect.isclass(base) and issubclass(base, Iterable) and base is not str:
        return isinstance(value, list)
    if base is datetime.timedelta:
        return False  # only reachable as a mapping (dict[str, int]) or a string
    return not isinstance(value, bool | int | float | str | list)  # another class: not plain


def _describe(hint: Any) -> str:
    names = {bool: "true | false", int: "an integer", float: "a number", str: "a string",
             type(None): "null"}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arm) for arm in typing.get_args(hint)))
    if origin is typing.Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    return names.get(hint, getattr(hint, "__name__", str(hint)))



def check_sizes(sizes: Mapping[str, Any]) -> None:
    """Every size of `model.sizes`, the ones not chosen too (`model.size=NAME` must not
    fail later): a key of the model section has that key's type, and any other (a
    component's width, read by interpolation) the same kind of value in every size, or
    null."""
    if not sizes:
        return
    typed = OmegaConf.structured(ModelConfig)
    entries = {name: OmegaConf.to_container(entry, resolve=False) if OmegaConf.is_config(entry)
               else entry for name, entry in sizes.items()}
    for name, entry in entries.items():
        try:
            OmegaConf.merge(typed, {key: value for key, value in entry.items() if key in typed})
        except OmegaConfBaseException as error:
            key = str(error.full_key)
            raise ConfigError(f"model.sizes.{name}.{key}", entry.get(key),
                              f"a value of model.{key}'s type", "wrong type") from None
    others = {key for entry in entries.values() for key in entry if key not in typed}
    for key in sorted(others):
        kinds = {name: _kind(entry[key]) for name, entry in entries.items()
                 if entry.get(key) is not None}
        usual = Counter(kinds.values()).most_common(1)[0][0] if kinds else None
        for name, kind in kinds.items():
            check(kind == usual, f"model.sizes.{name}.{key}", entries[name][key],
                  f"{usual}, as the other sizes give", "wrong type")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else type(value).__name__
