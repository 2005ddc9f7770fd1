"""Name -> (config dataclass, builder) registries for every pluggable component.

Adding a scheme is one module that registers itself, one YAML under `conf/<kind>/`
whose `name:` picks it, and one test. Nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from moa.errors import ConfigError
from moa.schema import parse, to_plain

B = TypeVar("B")


@dataclass(frozen=True)
class Entry(Generic[B]):
    config: type
    builder: Callable[..., B]


class Registry(Generic[B]):
    """Components of one kind (`attention`, `ffn`, ...), looked up by the `name` key."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[B]] = {}

    def register(self, name: str, config: type) -> Callable[[Callable[..., B]], Callable[..., B]]:
        def add(builder: Callable[..., B]) -> Callable[..., B]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(config, builder)
            return builder

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str, key: str | None = None) -> Entry[B]:
        if name not in self._entries:
            raise ConfigError(f"{key or self.kind}.name", name, " | ".join(self.names()))
        return self._entries[name]

    def parse(self, data: Mapping[str, Any] | Any, key: str | None = None) -> Any:
        """The typed config for `data`, chosen by its `name` key."""
        key = key or self.kind
        data = to_plain(data)
        if isinstance(data, Mapping) and "name" in data:
            return parse(self.entry(data["name"], key).config, data, key)
        if hasattr(data, "name"):  # already a parsed config
            return data
        raise ConfigError(f"{key}.name", None, " | ".join(self.names()), "missing")

    def build(self, config: Any, *args: Any, **kwargs: Any) -> B:
        """Construct the component for an already-parsed config."""
        return self.entry(config.name).builder(config, *args, **kwargs)
