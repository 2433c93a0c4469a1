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
from importlib.metadata import EntryPoint
from typing import Any

from dspyrt.agents.assertions.validator import Validator
from dspyrt.runtime.plugins import EntryPointRegistry

ENTRY_POINT_GROUP = "dspyrt.validators"


class CustomValidatorRegistry:
    """Custom validators by name, from entry points (``dspyrt.validators`` unless given others)."""

    def __init__(self, entries: Iterable[EntryPoint] | None) -> None:
        """``entries``: the validators' entry points (``None``: those installed)."""
        self._validators = EntryPointRegistry(ENTRY_POINT_GROUP, "validator", _validator, entries=entries)

    @classmethod
    def installed(cls) -> CustomValidatorRegistry:
        """Every validator installed under the ``dspyrt.validators`` entry-point group."""
        return cls(None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return self._validators.names()

    def load(self, name: str) -> Validator:
        """The validator ``name``: its entry point's object, or an instance of its class."""
        return self._validators.get(name)

    def load_all(self) -> dict[str, Validator]:
        """Every registered validator, by name."""
        return self._validators.load_all()


def _validator(target: Any) -> Validator:
    validator = target() if isinstance(target, type) else target
    if not callable(getattr(validator, "validate", None)):
        raise TypeError("has no validate(request) method")
    loaded: Validator = validator
    return loaded
