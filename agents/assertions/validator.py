"""What a validator is (:class:`Validator`), and running one so that a broken validator is a failed check."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import ValidationError

from dspyrt.agents.assertions.models import AssertionResult, AssertionType, Severity, ValidationRequest

log = logging.getLogger(__name__)


@runtime_checkable
class Validator(Protocol):
    """Anything with ``validate(request) -> list[AssertionResult]``: the built-ins, plugins, your own.

    ``validate`` runs in a worker thread and may be called for several requests at once. Results may also
    be plain mappings with the fields of :class:`AssertionResult`; their ``type`` is set to the type the
    validator is registered under.
    """

    def validate(self, request: ValidationRequest) -> Sequence[AssertionResult | Mapping[str, Any]]: ...


def validator_name(validator: object) -> str:
    """A validator's ``name`` attribute, or its class name."""
    name = getattr(validator, "name", None)
    return name if isinstance(name, str) and name else type(validator).__name__


def run_validator(
    assertion_type: AssertionType, validator: Validator, request: ValidationRequest
) -> list[AssertionResult]:
    """Run one validator; a validator that raises or returns something else yields one failed result."""
    name = validator_name(validator)
    try:
        produced = validator.validate(request)
        return [_as_result(item, assertion_type) for item in produced]
    except Exception as exc:  # a broken validator is a failed check, never a crashed agent
        log.warning("validator %s failed", name, exc_info=True)
        return [
            AssertionResult(
                type=assertion_type,
                check="validator_error",
                passed=False,
                severity=Severity.ERROR,
                message=f"validator {name} failed: {type(exc).__name__}: {exc}",
            )
        ]


def _as_result(item: Any, assertion_type: AssertionType) -> AssertionResult:
    if isinstance(item, AssertionResult):
        return item if item.type == assertion_type else item.model_copy(update={"type": assertion_type})
    if isinstance(item, Mapping):
        try:
            return AssertionResult.model_validate({**item, "type": assertion_type})
        except ValidationError as exc:
            raise TypeError(f"returned an invalid result: {exc.errors(include_url=False)[0]['msg']}") from None
    raise TypeError(f"returned {type(item).__name__}, not an AssertionResult")
