"""Registries: a dict, a decorator and list/get helpers, one per extension point.

Unknown names fail with the valid names and the nearest match; registering a name twice is an error.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kneeoa.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (backbones, encoders, tasks, importers, stages, report sections).

    Example:
        >>> r = Registry("colour")
        >>> r.add("red", 1)
        1
        >>> r.get("red")
        1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        key = name.lower()
        if key in self._entries:
            raise ValueError(f"{self.kind} '{key}' is registered twice; pick another name.")
        self._entries[key] = entry
        return entry

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator filing a function or class under `name` (default: its `__name__`)."""

        def wrap(obj: T) -> T:
            return self.add(name or obj.__name__, obj)  # type: ignore[attr-defined]

        return wrap

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._entries:
            valid = ", ".join(self._entries) or "(none)"
            near = difflib.get_close_matches(key, list(self._entries), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"Unknown {self.kind} '{name}'. Valid: {valid}.{hint}")
        return self._entries[key]

    def remove(self, name: str) -> T:
        """Unregister `name` (an entry added for a while, e.g. a plugin or a test's toy entry); returns it."""
        entry = self.get(name)
        del self._entries[str(name).lower()]
        return entry

    def update(self, entries: dict[str, T]) -> None:
        """Add several entries, in order."""
        for name, entry in entries.items():
            self.add(name, entry)

    def load(self, name: str):
        """Resolve a lazy entry, a "module:attribute" string, to the object it names (imported on first use)."""
        module, _, attr = str(self.get(name)).partition(":")
        return getattr(importlib.import_module(module), attr)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()
