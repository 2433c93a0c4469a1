"""Custom validators: plugins installed under the entry-point group ``dspyrt.validators``.

An entry point names a validator class (called with no arguments) or a ready validator object; either way
the result must have ``validate(request) -> list[AssertionResult]``. In a package's ``pyproject.toml``::

    [project.entry-points."dspyrt.validators"]
    no-apologies = "my_package.checks:NoApologies"

Plugins run as ``AssertionType.CUSTOM``. In Python, register one directly with
``framework.add_validator(AssertionType.CUSTOM, validator)``. Like every other registry of this project,
a name is looked up only among installed entry points: nothing from the bus is imported.

The guide writes validators of a live module, ``validate(module, test_inputs) -> list[AssertionResult]``.
:func:`as_validator` adapts those (:class:`ModuleValidator`) and refuses anything with neither form, at
registration: they run when the framework is given the module (``validate_module``, or ``validate(request,
module=...)``); a validation of recorded outputs alone reports each of them as a ``needs_module`` warning.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import EntryPoint
from typing import Any

from dspyrt.agents.assertions.models import AssertionResult, AssertionType, Severity, ValidationRequest
from dspyrt.agents.assertions.validator import Validator, validator_name
from dspyrt.bus.errors import ConfigurationError
from dspyrt.runtime.plugins import EntryPointRegistry

ENTRY_POINT_GROUP = "dspyrt.validators"
EXPECTED_INTERFACE = (
    "validate(request: ValidationRequest) -> list[AssertionResult], or the guide's "
    "validate(module, test_inputs: list[dict]) -> list[AssertionResult]"
)


class ModuleValidator:
    """A guide-style validator (``validate(module, test_inputs)``) behind the :class:`Validator` protocol.

    With no module (a request of recorded outputs, as on the bus) it reports one ``needs_module`` warning
    instead of running; :meth:`bind` gives the validator of one module, which gets the request's case inputs."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.name = validator_name(target)

    def validate(self, request: ValidationRequest) -> list[AssertionResult]:
        return [
            AssertionResult(
                type=AssertionType.CUSTOM,  # the framework sets the type it is registered under
                check="needs_module",
                passed=False,
                severity=Severity.WARNING,
                message=f"validator {self.name} checks a live module (validate(module, test_inputs)) and this "
                "validation has recorded outputs only: it did not run; use validate_module(module, test_inputs)",
            )
        ]

    def bind(self, module: Any) -> Validator:
        """The validator of ``module``: the guide's validator called with it and the request's inputs."""
        return _BoundModuleValidator(self.target, self.name, module)


class _BoundModuleValidator:
    def __init__(self, target: Any, name: str, module: Any) -> None:
        self.target = target
        self.name = name
        self.module = module

    def validate(self, request: ValidationRequest) -> Sequence[AssertionResult | Mapping[str, Any]]:
        produced: Sequence[AssertionResult | Mapping[str, Any]] = self.target.validate(
            self.module, [dict(case.inputs) for case in request.cases]
        )
        return produced


def as_validator(candidate: Any) -> Validator:
    """``candidate`` as a :class:`Validator`: itself when its ``validate`` takes a request, a
    :class:`ModuleValidator` when it takes ``(module, test_inputs)``; :class:`ConfigurationError` naming both
    interfaces otherwise (a class instead of an instance included)."""
    what = validator_name(candidate)
    if isinstance(candidate, type):
        raise ConfigurationError(f"{candidate.__name__} is a class: register an instance of it ({EXPECTED_INTERFACE})")
    method = getattr(candidate, "validate", None)
    if not callable(method):
        raise ConfigurationError(f"{what} has no validate method: a validator needs {EXPECTED_INTERFACE}")
    required = _positional(method)
    if required == 2:
        return ModuleValidator(candidate)
    if required in (1, None):  # None: a signature that cannot be read is taken at its word
        validator: Validator = candidate
        return validator
    raise ConfigurationError(
        f"{what}.validate takes {required} positional argument(s): a validator needs {EXPECTED_INTERFACE}"
    )


def _positional(method: Any) -> int | None:
    """How many positional arguments ``method`` (bound) requires; ``None`` when its signature cannot be read
    or it takes ``*args``."""
    try:
        parameters = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len([p for p in positional if p.default is inspect.Parameter.empty]) or len(positional)


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
    try:
        return as_validator(target() if isinstance(target, type) else target)
    except ConfigurationError as exc:
        raise TypeError(exc.message) from None
