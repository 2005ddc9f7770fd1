"""Parse plain mappings into typed config dataclasses with errors that name the key.

Every config section is a dataclass. `parse` checks unknown keys and types through
OmegaConf's structured configs, then constructs the dataclass, whose `__post_init__`
validates values and raises `ConfigError` with the field's name; `parse` prefixes it
with the section's key so the message shows the full path (`model.n_heads`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moa.errors import ConfigError

T = TypeVar("T")


def to_plain(data: Any) -> Any:
    """A resolved plain-Python copy of an OmegaConf node (or the value itself)."""
    if isinstance(data, DictConfig) or OmegaConf.is_list(data):
        return OmegaConf.to_container(data, resolve=True)
    return data


def parse(cls: type[T], data: Mapping[str, Any] | DictConfig, key: str) -> T:
    """Build `cls` from `data`, raising `ConfigError` naming `key.<field>` on bad input."""
    data = to_plain(data)
    if not isinstance(data, Mapping):
        raise ConfigError(key, data, f"a mapping with keys {sorted(field_names(cls))}")
    allowed = field_names(cls)
    for name in data:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), sorted(allowed), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "unknown key"
            raise ConfigError(f"{key}.{name}", data[name], f"keys {sorted(allowed)}", hint)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls), data)
    except OmegaConfBaseException as error:
        full_key = f"{key}.{error.full_key}" if getattr(error, "full_key", None) else key
        value = _select(data, str(error.full_key)) if error.full_key else data
        expected = _expected_type(cls, error.full_key)
        raise ConfigError(full_key, value, expected, "wrong type") from None
    try:
        return OmegaConf.to_object(typed)
    except ConfigError as error:
        raise error.under(key) from None


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _select(data: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        data = data.get(name) if isinstance(data, Mapping) else None
    return data


def _expected_type(cls: type, field: str | None) -> str:
    """The declared type of `field` (dotted: a nested dataclass's field)."""
    head, _, rest = (field or "").partition(".")
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if f.name == head:
            nested = hints.get(f.name)
            if rest and dataclasses.is_dataclass(nested):
                return _expected_type(nested, rest)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)
            return f"a value of type {kind}"
    return "values of the declared types"


def check(condition: bool, key: str, value: Any, allowed: str, reason: str = "") -> None:
    """Raise `ConfigError(key, value, allowed)` unless `condition` holds."""
    if not condition:
        raise ConfigError(key, value, allowed, reason)


def check_choice(key: str, value: Any, choices: list[str] | tuple[str, ...]) -> None:
    check(value in choices, key, value, " | ".join(map(str, choices)))


def check_range(
    key: str, value: float, low: float | None = None, high: float | None = None,
    *, low_open: bool = False, high_open: bool = False,
) -> None:
    """Check `low <(=) value <(=) high`; open ends are exclusive."""
    ok = True
    if low is not None:
        ok &= value > low if low_open else value >= low
    if high is not None:
        ok &= value < high if high_open else value <= high
    lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
    hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
    check(ok, key, value, f"{lo}{key.split('.')[-1]}{hi}")
