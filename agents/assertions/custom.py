"""Custom validators: plugins installed under the entry-point group ``dspyrt.validators``.

An entry point names a validator class (called with no arguments) or a ready validator object; either way
the result must have ``validate(request) -> list[AssertionResult]``. In a package's ``pyproject.toml``::

    [project.entry-points."dspyrt.validators"]
    no-apologies = "my_package.checks:NoApologies"

Plugins run as ``AssertionType.CUSTOM``. In Python, register one directly with
``framework.add_validator(AssertionType.CUSTOM, validator)``. Like every other registry of this project,
a name is looked up only among installed entry points: nothing from the bus is imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from dspyrt.agents.assertions.core import Validator
from dspyrt.bus.errors import ConfigurationError, NotFoundError

ENTRY_POINT_GROUP = "dspyrt.validators"


class CustomValidatorRegistry:
    """Custom validators by name, from entry points (``dspyrt.validators`` unless given others)."""

    def __init__(self, entries: Iterable[EntryPoint]) -> None:
        by_name: dict[str, EntryPoint] = {}
        for entry in entries:
            known = by_name.get(entry.name)
            if known is not None and known.value != entry.value:
                raise ConfigurationError(
                    f"validator {entry.name!r} is registered twice: {known.value} and {entry.value}"
                )
            by_name[entry.name] = entry
        self._entries = by_name

    @classmethod
    def installed(cls) -> CustomValidatorRegistry:
        """Every validator installed under the ``dspyrt.validators`` entry-point group."""
        return cls(entry_points(group=ENTRY_POINT_GROUP))

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def load(self, name: str) -> Validator:
        """The validator ``name``: its entry point's object, or an instance of its class."""
        entry = self._entries.get(name)
        if entry is None:
            raise NotFoundError(f"unknown validator {name!r}; known: {', '.join(self.names()) or 'none installed'}")
        try:
            target = entry.load()
            validator = target() if isinstance(target, type) else target
        except Exception as exc:  # an installed plugin that fails to load is a deployment problem
            raise ConfigurationError(f"validator {name!r} ({entry.value}) cannot be loaded: {exc}") from exc
        if not callable(getattr(validator, "validate", None)):
            raise ConfigurationError(f"validator {name!r} ({entry.value}) has no validate(request) method")
        loaded: Validator = validator
        return loaded

    def load_all(self) -> dict[str, Validator]:
        """Every registered validator, by name."""
        return {name: self.load(name) for name in self.names()}
