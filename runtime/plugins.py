"""Plugins by name: the one registry behind every entry-point group of the project.

Agents (``dspyrt.agents``), metrics (``dspyrt.metrics``), programs (``dspyrt.programs``), custom validators
(``dspyrt.validators``), optimizers (``dspyrt.optimizers``) and OpenTelemetry instrumentors
(``opentelemetry_instrumentor``) are each an :class:`EntryPointRegistry`: names are known from the entry points'
metadata, and an entry point is imported only when its name is first asked for. Nothing from the bus is ever
imported: a name is looked up only among installed entry points, built-ins and in-process registrations.

Errors name the plugin and what is wrong with it: an unknown name is :class:`~dspyrt.bus.errors.NotFoundError`
(with the names known); an entry point that does not import, or imports something of the wrong kind, and two
distributions registering one name differently, are :class:`~dspyrt.bus.errors.ConfigurationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from dspyrt.bus.errors import ConfigurationError, NotFoundError

T = TypeVar("T")


class EntryPointRegistry(Generic[T]):
    """Plugins of one kind by name: ``builtins``, then the entry points of ``group``, loaded on first use.

    ``kind`` names a plugin in messages (``"metric"``: ``unknown metric 'x'``). ``accept`` turns what an entry
    point loads into the plugin (checking it, or making it: a class may be instantiated); it raises ``TypeError``
    saying what the object lacks (``"has no validate(request) method"``), which becomes a ``ConfigurationError``
    naming the entry point. ``entries`` defaults to the installed entry points of ``group``. An entry point may
    not take a built-in's name, and two entry points may share a name only when they point to the same object
    (one distribution seen twice on the path).
    """

    def __init__(
        self,
        group: str,
        kind: str,
        accept: Callable[[Any], T],
        *,
        entries: Iterable[EntryPoint] | None = None,
        builtins: Mapping[str, T] | None = None,
    ) -> None:
        self.group = group
        self.kind = kind
        self._accept = accept
        self._builtins: Mapping[str, T] = MappingProxyType(dict(builtins or {}))
        by_name: dict[str, EntryPoint] = {}
        for entry in entry_points(group=group) if entries is None else entries:
            if entry.name in self._builtins:
                raise ConfigurationError(f"{kind} plugin {entry.value} may not replace the built-in {entry.name!r}")
            known = by_name.get(entry.name)
            if known is not None and known.value != entry.value:
                raise ConfigurationError(f"{kind} {entry.name!r} is registered twice: {known.value} and {entry.value}")
            by_name[entry.name] = entry
        self._entries = by_name
        self._registered: dict[str, T] = {}  # made in this process: they win over an entry point of their name
        self._loaded: dict[str, T] = {}  # entry points already loaded and accepted

    def names(self) -> list[str]:
        """Every name: built-ins, entry points and registrations, sorted."""
        return sorted({*self._builtins, *self._entries, *self._registered})

    def __contains__(self, name: object) -> bool:
        return name in self._builtins or name in self._registered or name in self._entries

    def get(self, name: str) -> T:
        """The plugin ``name``; an entry point is loaded (and accepted) on first use."""
        for found in (self._builtins, self._registered, self._loaded):
            if name in found:
                return found[name]
        entry = self._entries.get(name)
        if entry is None:
            raise NotFoundError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none installed'}")
        try:
            loaded = entry.load()
        except Exception as exc:  # an installed plugin that fails to import is a deployment problem
            raise ConfigurationError(f"{self.label(name)} cannot be loaded: {exc}") from exc
        try:
            plugin = self._accept(loaded)
        except TypeError as exc:  # loaded, but not what this group expects
            raise ConfigurationError(f"{self.label(name)} {exc}") from exc
        except Exception as exc:  # making it failed (a validator class whose constructor raises)
            raise ConfigurationError(f"{self.label(name)} cannot be loaded: {exc}") from exc
        self._loaded[name] = plugin
        return plugin

    def load_all(self) -> dict[str, T]:
        """Every plugin by name, each entry point loaded."""
        return {name: self.get(name) for name in self.names()}

    def register(self, name: str, plugin: T) -> None:
        """Add a plugin made in this process; it wins over an entry point of the same name, not over a built-in."""
        if name in self._builtins:
            raise ConfigurationError(f"{self.kind} {name!r} is a built-in and cannot be replaced")
        self._registered[name] = plugin

    def label(self, name: str) -> str:
        """How messages name a plugin: kind, name and origin (``metric 'ratio' (my_pkg.metrics:ratio)``)."""
        if name in self._builtins:
            origin = "built-in"
        elif name in self._registered:
            origin = "registered in process"
        elif name in self._entries:
            origin = self._entries[name].value
        else:
            origin = "not registered"
        return f"{self.kind} {name!r} ({origin})"
