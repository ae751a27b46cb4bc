"""Registries: one per extension point, filled with `add(name, entry)` and read with `get(name)`.

An entry is the object itself or a lazy "module:attribute" string, which `get` imports on first use and caches, so
an entry that needs torch (or builds on the registry's own module) costs nothing until it is chosen. Unknown names
fail with the valid names and the nearest match; registering a name twice is an error; an entry that carries a name
(`.name`, e.g. a `Task`) must be filed under that name.

Plugins. Five registries also take entries from installed distributions, through entry points of their group; the
entry point's name is the entry's name and the object it points to is the entry:

==================  =============================================  ================================================
group               entry                                          registry
==================  =============================================  ================================================
kneeoa.backbones    `kneeoa.models.cnn.backbones.Backbone`         `kneeoa.models.cnn.backbones.BACKBONES`
kneeoa.encoders     `kneeoa.models.encoders.spec.EncoderSpec`      `kneeoa.models.encoders.foundation.ENCODERS`
kneeoa.tasks        `kneeoa.tasks.Task`                            `kneeoa.tasks.TASKS`
kneeoa.importers    `kneeoa.sources.importers.ImporterSpec`        `kneeoa.sources.importers.IMPORTERS`
kneeoa.localizers   a function `fn(image, spacing_mm, knees=n)`    `kneeoa.localize.core.LOCALIZERS`
==================  =============================================  ================================================

A distribution declares them in its pyproject.toml, e.g.::

    [project.entry-points."kneeoa.backbones"]
    mynet = "my_package.models:MYNET"

A registry reads its group's entry points on its first lookup or iteration (names only; the plugin's module is
imported when its entry is first used). A plugin whose name clashes with a built-in entry or another plugin, that
fails to import, or that points to the wrong kind of object raises `PluginError` naming the distribution, the entry
point and the fix. `reload_plugins()` makes every registry read its group again (after installing a plugin in a
running process, and in tests).
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from kneeoa.errors import ConfigError, KneeoaError

T = TypeVar("T")

_LAZY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_WITH_PLUGINS: list[Registry] = []


class PluginError(KneeoaError):
    """An installed plugin's entry point cannot be used (the message names the distribution, entry point and fix)."""


def resolve(entry: Any) -> Any:
    """The object a lazy "module:attribute" string names (imported now); any other entry as it is."""
    if not isinstance(entry, str):
        return entry
    module, _, attr = entry.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(ep: EntryPoint) -> str:
    dist = ep.dist.name if ep.dist is not None else "an unnamed distribution"
    return f"distribution '{dist}' (entry point `{ep.name} = {ep.value}` in group '{ep.group}')"


class Registry(Generic[T]):
    """Named entries of one kind (backbones, encoders, tasks, importers, stages, report sections).

    Args:
        kind: what an entry is, for messages ("backbone").
        group: the entry-point group plugins add entries through (see the module docstring); None: built-ins only.
        entry_type: the class (or `collections.abc.Callable`) every entry must be an instance of; None: any.

    Example:
        >>> r = Registry("colour")
        >>> r.add("red", 1)
        1
        >>> r.get("red")
        1
        >>> _ = r.add("join", "os.path:join")  # lazy: imported by the first get
        >>> r.get("join").__name__
        'join'
    """

    def __init__(self, kind: str, *, group: str | None = None, entry_type: type | None = None) -> None:
        self.kind, self.group, self.entry_type = kind, group, entry_type
        # An object, or until its first `get` a "module:attr" string or a plugin's EntryPoint (then the object).
        self._entries: dict[str, Any] = {}
        self._from_plugins: set[str] = set()
        self._plugins_read = group is None
        if group is not None:
            _WITH_PLUGINS.append(self)

    # ----------------------------------------------------------------------------------------------- adding entries

    def add(self, name: str, entry: T | str) -> T | str:
        """File `entry` (an object, or a lazy "module:attribute" string) under `name`; returns `entry`.

        Raises:
            ValueError: `name` is registered already, or a string entry is not "module:attribute".
            TypeError: the entry is not an `entry_type`, or carries another name than `name`.
        """
        key = name.lower()
        if key in self._entries:
            raise ValueError(f"{self.kind} '{key}' is registered twice; pick another name.")
        if isinstance(entry, str):
            if not _LAZY.match(entry):
                raise ValueError(f"{self.kind} '{key}': a string entry is a lazy 'module:attribute' reference; "
                                 f"got {entry!r}.")
        else:
            problem = self._problem(key, entry)
            if problem:
                raise TypeError(f"{self.kind} '{key}' {problem}.")
        self._entries[key] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregister `name` (an entry added for a while, e.g. a test's toy entry)."""
        key = self._key(name)
        del self._entries[key]
        self._from_plugins.discard(key)

    def reload_plugins(self) -> None:
        """Forget the entries read from entry points; the next lookup reads the group again."""
        if self.group is None:
            return
        for key in self._from_plugins:
            del self._entries[key]
        self._from_plugins.clear()
        self._plugins_read = False

    # ---------------------------------------------------------------------------------------------- reading entries

    def get(self, name: str) -> T:
        """The entry filed under `name`, a lazy one imported on first use (and kept).

        Raises:
            ConfigError: no such entry (names the valid ones and the nearest match).
            PluginError: a plugin of the registry's group clashes with another entry, or the entry is a plugin that
                fails to import or points to the wrong kind of object.
        """
        key = self._key(name)
        entry = self._entries[key]
        if isinstance(entry, EntryPoint):
            self._entries[key] = self._load_plugin(key, entry)
        elif isinstance(entry, str):
            obj = resolve(entry)
            problem = self._problem(key, obj)
            if problem:
                raise TypeError(f"{self.kind} '{key}' ({entry}) {problem}.")
            self._entries[key] = obj
        return self._entries[key]

    def names(self) -> list[str]:
        self._read_plugins()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in registration order (built-ins first, then plugins), every lazy entry imported."""
        return [(name, self.get(name)) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        self._read_plugins()
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # ------------------------------------------------------------------------------------------------------ helpers

    def _key(self, name: str) -> str:
        self._read_plugins()
        key = str(name).lower()
        if key not in self._entries:
            valid = ", ".join(self._entries) or "(none)"
            near = difflib.get_close_matches(key, list(self._entries), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"Unknown {self.kind} '{name}'. Valid: {valid}.{hint}")
        return key

    def _problem(self, key: str, obj: Any, *, plugin: bool = False) -> str | None:
        """Why `obj` cannot be the entry `key` (wrong type, or its own `.name` differs) and the fix, or None."""
        want = self.entry_type
        if want is not None and not isinstance(obj, want):
            wanted = f"{want.__module__}.{want.__qualname__}"
            fix = f"point the entry point at a {wanted}" if plugin else f"register a {wanted}"
            return f"is of type {type(obj).__name__}, not a {wanted}; {fix}"
        own = getattr(obj, "name", None)
        if isinstance(own, str) and own.lower() != key:
            fix = f"name the entry point '{own}'" if plugin else f"file it under '{own}'"
            return f"carries the name '{own}'; {fix} or rename the object to '{key}'"
        return None

    def _read_plugins(self) -> None:
        """Add the group's entry points (names only) once; a clash fails every lookup until it is resolved."""
        if self._plugins_read:
            return
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=self.group):
            key = ep.name.lower()
            if key in found:
                raise PluginError(f"Two plugins declare the {self.kind} '{key}': {_describe(found[key])} and "
                                  f"{_describe(ep)}. Uninstall one of them, or rename one entry point.")
            if key in self._entries:
                raise PluginError(f"The {self.kind} '{key}' of {_describe(ep)} clashes with the built-in {self.kind} "
                                  f"'{key}'. Rename the entry point (the name is what configs use), or uninstall "
                                  "the distribution.")
            found[key] = ep
        self._entries.update(found)
        self._from_plugins.update(found)
        self._plugins_read = True

    def _load_plugin(self, key: str, ep: EntryPoint) -> T:
        try:
            obj = ep.load()
        except Exception as e:  # any failure of the plugin's own import is reported as the plugin's
            raise PluginError(f"The {self.kind} '{key}' of {_describe(ep)} fails to import: {type(e).__name__}: "
                              f"{e}. Fix or reinstall the distribution, or uninstall it.") from e
        problem = self._problem(key, obj, plugin=True)
        if problem:
            raise PluginError(f"The {self.kind} '{key}' of {_describe(ep)} {problem}.")
        return obj


def reload_plugins() -> None:
    """Make every registry with an entry-point group read its group again on its next lookup."""
    for registry in _WITH_PLUGINS:
        registry.reload_plugins()
